import numpy as np
import pytest
from PIL import Image

from kerasrot import data
from tests.conftest import pretend_not_installed, write_image_folders


def test_image_folder_split_loads_every_image_with_sorted_class_labels(data_root):
    split = data.load_split("cifar10", "train", 32, str(data_root))
    assert split.images.shape == (120, 32, 32, 3) and split.images.dtype == np.uint8
    assert np.bincount(split.labels).tolist() == [12] * 10
    assert split.class_names == sorted(split.class_names)
    assert split.source.endswith("cifar10 (PNG, stored 32x32)")


def test_imagenette_is_resized_to_the_model_input_and_says_its_stored_size(data_root):
    split = data.load_split("imagenette", "test", 32, str(data_root))
    assert split.images.shape == (40, 32, 32, 3)
    assert split.source.endswith("imagenette (PNG, stored 48x48)")


def read_both_ways(root, folder, size):
    """The arrays of ImageFolder (TensorFlow) and of Pillow (where TensorFlow is missing)."""
    files, _, _ = data.list_image_folder(root / folder)
    return data._decode_with_image_folder(root, folder, files, size), data._decode_with_pillow(files, size)


@pytest.mark.parametrize("suffix,quality", [(".png", 95), (".jpg", 95), (".jpeg", 75)])
def test_image_folder_and_pillow_readers_give_identical_arrays(tmp_path, suffix, quality):
    pytest.importorskip("tensorflow_datasets")
    write_image_folders(tmp_path, "cifar10", ["test"], 3, 32, suffix=suffix, quality=quality)
    (tf_images, tf_sizes), (pil_images, pil_sizes) = read_both_ways(tmp_path / "cifar10", "test", 32)
    np.testing.assert_array_equal(tf_images, pil_images)
    assert tf_sizes == pil_sizes == {(32, 32)}


def test_readers_agree_when_resizing(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    write_image_folders(tmp_path, "imagenette", ["val"], 2, 48, suffix=".png")
    (tf_images, _), (pil_images, _) = read_both_ways(tmp_path / "imagenette", "val", 32)
    assert tf_images.shape == pil_images.shape == (20, 32, 32, 3)
    # both antialiased bilinear, rounded: at most a gray level or two apart
    assert np.abs(tf_images.astype(int) - pil_images.astype(int)).max() <= 2


@pytest.mark.parametrize("tensorflow_installed", [True, False])
def test_grayscale_and_png_images_among_jpegs_load_as_rgb(tmp_path, monkeypatch, tensorflow_installed):
    if tensorflow_installed:
        pytest.importorskip("tensorflow_datasets")
    else:  # the Pillow reader, as on a machine without TensorFlow
        pretend_not_installed(monkeypatch, "tensorflow")
    write_image_folders(tmp_path, "cifar10", ["test"], 2, 32, suffix=".jpg")
    folder = tmp_path / "cifar10" / "test" / "class3"
    Image.fromarray(np.full((32, 32), 200, dtype=np.uint8), mode="L").save(folder / "gray.jpg")
    Image.fromarray(np.full((32, 32, 4), 100, dtype=np.uint8), mode="RGBA").save(folder / "alpha.PNG")
    files, _, _ = data.list_image_folder(tmp_path / "cifar10" / "test")
    split = data.load_split("cifar10", "test", 32, str(tmp_path))
    assert split.images.shape == (22, 32, 32, 3) and split.images.dtype == np.uint8
    assert np.bincount(split.labels)[3] == 4
    gray = split.images[files.index(str(folder / "gray.jpg"))]
    assert np.abs(gray.astype(int) - 200).max() <= 1  # R = G = B
    alpha = split.images[files.index(str(folder / "alpha.PNG"))]
    assert (alpha == 100).all()  # alpha dropped, colour kept
    assert "(JPEG/PNG, stored 32x32)" in split.source


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


@pytest.mark.parametrize("reader", ["image_folder", "pillow"])
def test_corrupt_image_stops_with_its_file_name(tmp_path, reader):
    if reader == "image_folder":
        pytest.importorskip("tensorflow_datasets")
    write_image_folders(tmp_path, "cifar10", ["test"], 2, 32, suffix=".jpg")
    bad = tmp_path / "cifar10/test/class2/000.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with pytest.raises(data.DataError, match="000.jpg"):
        read_both_ways(tmp_path / "cifar10", "test", 32) if reader == "image_folder" else \
            data._decode_with_pillow(data.list_image_folder(tmp_path / "cifar10" / "test")[0], 32)


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.load_split("mnist", "test", 32, "/nonexistent")
