import numpy as np
import pytest
from PIL import Image

from kerasrot import data, folders
from tests.conftest import write_image_folders


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


def read_both_ways(root, split, size):
    """The arrays of the image folder reader, and those `tfds.load` gives for the same files (TensorFlow decodes)."""
    import tensorflow as tf

    index = folders.scan(root)
    files, _ = folders.split_files(index, split)

    def tf_read(path):
        raw = tf.io.read_file(str(path))
        image = tf.cond(tf.io.is_jpeg(raw),
                        lambda: tf.io.decode_jpeg(raw, channels=3, dct_method="INTEGER_ACCURATE"),
                        lambda: tf.io.decode_png(raw, channels=3))
        return data._tf_resize(image, size).numpy()

    return data.load_split(root.name, split, size, str(root.parent)).images, np.stack([tf_read(root / f) for f in files])


@pytest.mark.parametrize("suffix,quality", [(".png", 95), (".jpg", 95), (".jpeg", 75)])
def test_the_image_folder_reader_decodes_exactly_as_tensorflows_accurate_decoder(tmp_path, suffix, quality):
    pytest.importorskip("tensorflow")
    write_image_folders(tmp_path, "cifar10", ["train", "test"], 3, 32, suffix=suffix, quality=quality)
    ours, tensorflow = read_both_ways(tmp_path / "cifar10", "test", 32)
    np.testing.assert_array_equal(ours, tensorflow)


def test_a_folder_copy_and_tfds_resize_alike(tmp_path):
    pytest.importorskip("tensorflow")
    write_image_folders(tmp_path, "imagenette", ["train", "val"], 2, 48, suffix=".png")
    ours, tensorflow = read_both_ways(tmp_path / "imagenette", "test", 32)
    assert ours.shape == tensorflow.shape == (20, 32, 32, 3)
    # both antialiased bilinear, rounded: at most a gray level or two apart
    assert np.abs(ours.astype(int) - tensorflow.astype(int)).max() <= 2


def test_grayscale_and_png_images_among_jpegs_load_as_rgb(tmp_path):
    write_image_folders(tmp_path, "cifar10", ["train", "test"], 2, 32, suffix=".jpg")
    folder = tmp_path / "cifar10" / "test" / "class3"
    Image.fromarray(np.full((32, 32), 200, dtype=np.uint8), mode="L").save(folder / "gray.jpg")
    Image.fromarray(np.full((32, 32, 4), 100, dtype=np.uint8), mode="RGBA").save(folder / "alpha.PNG")
    split = data.load_split("cifar10", "test", 32, str(tmp_path), streaming=True)
    files = [p.name for p in map(split.images.path, range(len(split)))]
    split = data.load_split("cifar10", "test", 32, str(tmp_path))
    assert split.images.shape == (22, 32, 32, 3) and split.images.dtype == np.uint8
    assert np.bincount(split.labels)[3] == 4
    gray = split.images[files.index("gray.jpg")]
    assert np.abs(gray.astype(int) - 200).max() <= 1  # R = G = B
    alpha = split.images[files.index("alpha.PNG")]
    assert (alpha == 100).all()  # alpha dropped, colour kept
    assert "(JPEG/PNG, stored 32x32)" in split.source


def test_missing_split_folder_is_a_clear_error(tmp_path):
    write_image_folders(tmp_path, "cifar10", ["train"], 1, 32)
    with pytest.raises(data.DataError, match="no folder .*cifar10/test"):
        data.load_split("cifar10", "test", 32, str(tmp_path))


def _with_train_split(tmp_path):
    write_image_folders(tmp_path, "cifar10", ["train"], 1, 32)


def test_wrong_number_of_class_folders_is_a_clear_error(tmp_path):
    _with_train_split(tmp_path)
    for name in ("only", "other"):
        (tmp_path / "cifar10" / "test" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / f"cifar10/test/{name}/a.png")
    with pytest.raises(data.DataError, match="2 class folders"):
        data.load_split("cifar10", "test", 32, str(tmp_path))


def test_images_without_class_folders_is_a_clear_error(tmp_path):
    _with_train_split(tmp_path)
    (tmp_path / "cifar10" / "test").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "cifar10/test/a.png")
    with pytest.raises(data.DataError, match="a.png is in no class folder"):
        data.load_split("cifar10", "test", 32, str(tmp_path))


def test_empty_class_folder_is_a_clear_error(tmp_path):
    write_image_folders(tmp_path, "cifar10", ["train", "test"], 1, 32)
    for f in (tmp_path / "cifar10/test/class4").iterdir():
        f.unlink()
    with pytest.raises(data.DataError, match="class4 holds no"):
        data.load_split("cifar10", "test", 32, str(tmp_path))


@pytest.mark.parametrize("streaming", [False, True])
def test_corrupt_image_stops_with_its_file_name(tmp_path, streaming):
    write_image_folders(tmp_path, "cifar10", ["train", "test"], 2, 32, suffix=".jpg")
    bad = tmp_path / "cifar10/test/class2/000.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated: the header reads, the pixels do not
    with pytest.raises(data.DataError, match="000.jpg"):
        split = data.load_split("cifar10", "test", 32, str(tmp_path), streaming=streaming)
        split.images[np.arange(len(split))]


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.load_split("mnist", "test", 32, "/nonexistent")
