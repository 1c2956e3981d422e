"""Shared fixtures: tiny synthetic image folders laid out like the real data."""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest
from PIL import Image


CLASSES = [f"class{i}" for i in range(10)]
REAL_DATA = Path(os.environ.get("KERASROT_DATA_DIR", "/tmp/kerasrot-data"))
ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def write_image_folders(root, dataset, splits, per_class, size, suffix=".png", seed=0, quality=95):
    """`root/dataset/<split>/<class>/NNN<suffix>`: class-tinted noise, so classes differ."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for label, name in enumerate(CLASSES):
            folder = Path(root) / dataset / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 120, size=(size, size, 3))
                pixels[..., label % 3] += 12 * label
                pixels[: size // 2, : size // 4] = 255  # an "up-left" mark: rotations differ
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}{suffix}", quality=quality)
    return Path(root)


def pretend_not_installed(monkeypatch, module):
    """Makes `importlib.util.find_spec(module)` answer None, as on a machine without that package."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == module else real(name, *rest))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A tiny CIFAR-10 (12 train / 4 test per class, 32x32) and ImageNette (48x48)."""
    root = tmp_path_factory.mktemp("data")
    write_image_folders(root, "cifar10", ["train"], 12, 32, seed=1)
    write_image_folders(root, "cifar10", ["test"], 4, 32, seed=2)
    write_image_folders(root, "imagenette", ["train"], 12, 48, seed=3)
    write_image_folders(root, "imagenette", ["val"], 4, 48, seed=4)
    return root


def pytest_collection_modifyitems(config, items):
    """Slow real-data tests run on the torch backend only (CI runs the suite per backend)."""
    if os.environ.get("KERAS_BACKEND", "torch") == "torch":
        return
    skip = pytest.mark.skip(reason="slow tests run on the torch backend only")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
