"""A short rotation run on a slice of the real CIFAR-10 learns the task.

A slice of /tmp/kerasrot-data (or $KERASROT_DATA_DIR) when it holds cifar10/,
else of ../shared/data/cifar10-jpeg.tar.gz unpacked into a temporary folder;
skipped when neither is there. About a minute on two idle CPU cores.
"""

import tarfile
from pathlib import Path

import pytest

from kerasrot.runner import config, stages
from tests.conftest import ARCHIVE, REAL_DATA

pytestmark = pytest.mark.slow


TRAIN_PER_CLASS, TEST_PER_CLASS = 100, 20


def _has_cifar10(root):
    return (root / "cifar10" / "train").is_dir() and (root / "cifar10" / "test").is_dir()


def _first_per_class(names):
    """`{split/class: [names]}` -> the first `per_class` sorted names of each class folder."""
    kept = []
    for folder, members in names.items():
        split = folder.split("/")[0]
        kept += sorted(members)[: TRAIN_PER_CLASS if split == "train" else TEST_PER_CLASS]
    return kept


@pytest.fixture(scope="module")
def real_data_dir(tmp_path_factory):
    """A slice of the real CIFAR-10 (100 train, 20 test images per class) as image folders.

    Only the slice is linked or unpacked: decoding all 60,000 images would
    take longer than the training.
    """
    slice_root = tmp_path_factory.mktemp("real")
    if _has_cifar10(REAL_DATA):
        folders = {}
        for image in (REAL_DATA / "cifar10").glob("*/*/*"):
            folders.setdefault(f"{image.parent.parent.name}/{image.parent.name}", []).append(str(image))
        for path in _first_per_class(folders):
            path = Path(path)
            target = slice_root / "cifar10" / path.parent.parent.name / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
        return slice_root
    if not ARCHIVE.exists():
        pytest.skip(f"no real data: neither {REAL_DATA}/cifar10 nor {ARCHIVE}")
    with tarfile.open(ARCHIVE) as archive:
        members = {m.name: m for m in archive.getmembers() if m.isfile() and m.name.startswith("cifar10/")}
        folders = {}
        for name in members:
            parts = name.split("/")
            if len(parts) == 4:
                folders.setdefault(f"{parts[1]}/{parts[2]}", []).append(name)
        archive.extractall(slice_root, members=[members[n] for n in _first_per_class(folders)], filter="data")
    if not _has_cifar10(slice_root):
        pytest.skip(f"{ARCHIVE} holds no cifar10/{{train,test}}/ folders")
    return slice_root


def test_short_rotation_run_on_real_cifar10_beats_chance_by_far(real_data_dir, tmp_path):
    overrides = config.parse_overrides([
        f"rotation.images_per_class={TRAIN_PER_CLASS}", f"rotation.test_images_per_class={TEST_PER_CLASS}",
        "rotation.epochs=4", "rotation.warmup_epochs=1", "rotation.batch_size=32", "rotation.samples_per_epoch=all",
        "rotation.learning_rate=0.05", "rotation.augment=false",
        "rotation.stem=imagenet", "rotation.precision=float32", "rotation.verbose=0",
    ])
    recipe = config.load("table1", "quick", overrides)
    options = stages.RunOptions(data_dir=str(real_data_dir), workdir=tmp_path, log=lambda *a: None)
    results = stages.run_recipe(recipe, options)
    rotation = results["rotation"]
    assert rotation["test_samples"] == 4 * TEST_PER_CLASS * 10
    assert [r["epoch"] for r in rotation["history"]] == [1, 2, 3, 4]
    assert rotation["accuracy"] > 33, rotation["history"]  # chance is 25
