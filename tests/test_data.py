import importlib.util

import numpy as np
import pytest
from PIL import Image

from kerasrot import data
from tests.conftest import write_image_folders


def test_image_folder_split_loads_every_image_with_sorted_class_labels(data_root):
    split = data.load_split("cifar10", "train", 32, str(data_root), reader="pillow")
    assert split.images.shape == (120, 32, 32, 3) and split.images.dtype == np.uint8
    assert np.bincount(split.labels).tolist() == [12] * 10
    assert split.class_names == sorted(split.class_names)


def test_imagenette_is_resized_to_the_model_input(data_root):
    split = data.load_split("imagenette", "test", 32, str(data_root), reader="pillow")
    assert split.images.shape == (40, 32, 32, 3)


@pytest.mark.parametrize("suffix,quality", [(".png", None), (".jpg", 95), (".jpeg", 75)])
def test_tfds_and_pillow_readers_give_identical_arrays(tmp_path, suffix, quality):
    pytest.importorskip("tensorflow_datasets")
    write_image_folders(tmp_path, "cifar10", ["test"], 3, 32, suffix=suffix, quality=quality or 95)
    pillow = data.load_split("cifar10", "test", 32, str(tmp_path), reader="pillow")
    tfds = data.load_split("cifar10", "test", 32, str(tmp_path), reader="tfds")
    np.testing.assert_array_equal(pillow.images, tfds.images)
    np.testing.assert_array_equal(pillow.labels, tfds.labels)
    assert pillow.class_names == tfds.class_names


def test_readers_agree_when_resizing(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    write_image_folders(tmp_path, "imagenette", ["val"], 2, 48, suffix=".png")
    pillow = data.load_split("imagenette", "test", 32, str(tmp_path), reader="pillow")
    tfds = data.load_split("imagenette", "test", 32, str(tmp_path), reader="tfds")
    assert pillow.images.shape == tfds.images.shape == (20, 32, 32, 3)
    # both antialiased bilinear, rounded: at most a gray level or two apart
    assert np.abs(pillow.images.astype(int) - tfds.images.astype(int)).max() <= 2


def test_grayscale_and_png_images_among_jpegs_load_as_rgb(tmp_path):
    write_image_folders(tmp_path, "cifar10", ["test"], 2, 32, suffix=".jpg")
    folder = tmp_path / "cifar10" / "test" / "class3"
    Image.fromarray(np.full((32, 32), 200, dtype=np.uint8), mode="L").save(folder / "gray.jpg")
    Image.fromarray(np.full((32, 32, 4), 100, dtype=np.uint8), mode="RGBA").save(folder / "alpha.PNG")
    files, _, _ = data.list_image_folder(tmp_path / "cifar10", "test")
    readers = ["pillow"] + (["tfds"] if importlib.util.find_spec("tensorflow_datasets") else [])
    for reader in readers:
        data.load_split.cache_clear()
        split = data.load_split("cifar10", "test", 32, str(tmp_path), reader=reader)
        assert split.images.shape == (22, 32, 32, 3) and split.images.dtype == np.uint8
        assert np.bincount(split.labels)[3] == 4
        gray = split.images[files.index(str(folder / "gray.jpg"))]
        assert np.abs(gray.astype(int) - 200).max() <= 1  # R = G = B
        alpha = split.images[files.index(str(folder / "alpha.PNG"))]
        assert (alpha == 100).all()  # alpha dropped, colour kept


def test_missing_split_folder_is_a_clear_error(tmp_path):
    write_image_folders(tmp_path, "cifar10", ["train"], 1, 32)
    with pytest.raises(data.DataError, match="no folder .*cifar10/test"):
        data.load_split("cifar10", "test", 32, str(tmp_path))


def test_wrong_number_of_class_folders_is_a_clear_error(tmp_path):
    (tmp_path / "cifar10" / "test" / "only").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "cifar10/test/only/a.png")
    with pytest.raises(data.DataError, match="1 class folders"):
        data.load_split("cifar10", "test", 32, str(tmp_path))


def test_images_without_class_folders_is_a_clear_error(tmp_path):
    (tmp_path / "cifar10" / "test").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "cifar10/test/a.png")
    with pytest.raises(data.DataError, match="has no class folders"):
        data.load_split("cifar10", "test", 32, str(tmp_path))


def test_empty_class_folder_is_a_clear_error(tmp_path):
    write_image_folders(tmp_path, "cifar10", ["test"], 1, 32)
    for f in (tmp_path / "cifar10/test/class4").iterdir():
        f.unlink()
    with pytest.raises(data.DataError, match="class4 holds no"):
        data.load_split("cifar10", "test", 32, str(tmp_path))


@pytest.mark.parametrize("reader", ["pillow", "tfds"])
def test_corrupt_image_stops_with_its_file_name(tmp_path, reader):
    if reader == "tfds":
        pytest.importorskip("tensorflow_datasets")
    write_image_folders(tmp_path, "cifar10", ["test"], 2, 32, suffix=".jpg")
    bad = tmp_path / "cifar10/test/class2/000.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with pytest.raises(data.DataError, match="000.jpg"):
        data.load_split("cifar10", "test", 32, str(tmp_path), reader=reader)


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.load_split("mnist", "test", 32, "/nonexistent")
