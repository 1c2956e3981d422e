"""Data: CIFAR-10 and ImageNette as NumPy arrays of uint8 images and int labels.

Both datasets are small enough to hold in memory (CIFAR-10 is 150 MB), so
every split is read once into arrays and `kerasrot.pipeline` makes batches
from there. Two ways in:

* `tfds.load(name)` downloads and prepares the dataset (needs internet).
* `--data-dir DIR` reads image folders, `DIR/<dataset>/<split>/<class>/*.jpg`
  (or .jpeg, .png), offline, with `tfds.folder_dataset.ImageFolder`.

Image folders have a second reader, Pillow, used only where TensorFlow is
not installed. It earns its place because GPU machines without TensorFlow
must still read the data (the lent ones have none, and its wheel is several
times larger than what can be copied to them); it is not faster (CIFAR-10's
50,000 training JPEGs on 2 cores: 8.3 s with Pillow, 11.5 s with
ImageFolder). Both decode exactly (TensorFlow's default JPEG decoder is a
fast, inexact one) and resize the same way, so they give the same arrays and
a run gives the same result whichever read its data (tests/test_data.py).
"""

import dataclasses
import functools
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DataError(Exception):
    """The data is missing or not what we expect; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    tfds_name: str
    splits: dict  # our split name -> (image folder name, tfds split name)
    num_classes: int = 10


DATASETS = {
    "cifar10": DatasetInfo("cifar10", {"train": ("train", "train"), "test": ("test", "test")}),
    "imagenette": DatasetInfo("imagenette/160px-v2", {"train": ("train", "train"), "test": ("val", "validation")}),
}


@dataclasses.dataclass
class Split:
    """One split of a dataset: `images` `[N, S, S, 3]` uint8, `labels` `[N]` int32."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list
    source: str  # where it was read from, for the provenance of results

    def __len__(self):
        return len(self.labels)

    def subset(self, indices):
        return Split(self.images[indices], self.labels[indices], self.class_names, self.source)


def dataset_info(name):
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


@functools.lru_cache(maxsize=8)
def load_split(dataset, split, image_size, data_dir=None):
    """Reads a whole split into memory (memoised: the stages of a run share it).

    Args:
        dataset: "cifar10" or "imagenette".
        split: "train" or "test" (ImageNette's "val").
        image_size: images are resized to `image_size x image_size`.
        data_dir: folder holding `<dataset>/<split>/<class>/` image folders;
            None downloads with `tfds.load`.
    """
    info = dataset_info(dataset)
    folder, tfds_split = info.splits[split]
    if data_dir is None:
        return _read_with_tfds_load(info, tfds_split, image_size)
    root = Path(data_dir).expanduser() / dataset
    files, labels, class_names = list_image_folder(root / folder)
    if len(class_names) != info.num_classes:
        raise DataError(f"{root / folder} has {len(class_names)} class folders, {dataset} has {info.num_classes}")
    if importlib.util.find_spec("tensorflow") is not None:
        images, sizes = _decode_with_image_folder(root, folder, files, image_size)
    else:
        images, sizes = _decode_with_pillow(files, image_size)
    formats = "/".join(sorted({Path(f).suffix.lstrip(".").upper().replace("JPG", "JPEG") for f in files}))
    return Split(images, labels, class_names, f"image folder {root} ({formats}, stored {_size_range(sizes)})")


def list_image_folder(top):
    """Sorted image paths, their labels and the class names of `top/<class>/<image>`."""
    if not top.is_dir():
        raise DataError(f"no folder {top}: expected images as {top}/<class>/<image>.jpg (see README, 'Data')")
    class_names = sorted(p.name for p in top.iterdir() if p.is_dir())
    if not class_names:
        raise DataError(f"{top} has no class folders: expected {top}/<class>/<image>.jpg")
    files, labels = [], []
    for label, name in enumerate(class_names):
        images = sorted(str(p) for p in (top / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"class folder {top / name} holds no .jpg, .jpeg or .png images")
        files += images
        labels += [label] * len(images)
    return files, np.asarray(labels, dtype="int32"), class_names


def _size_range(sizes):
    """`{(96, 96)}` -> "96x96"; several sizes -> "32x32 to 500x375"."""
    sizes = sorted(sizes, key=lambda s: (s[0] * s[1], s))
    names = [f"{w}x{h}" for w, h in (sizes[0], sizes[-1])]
    return names[0] if names[0] == names[1] else f"{names[0]} to {names[1]}"


# -- ImageFolder (TensorFlow) -----------------------------------------------


def _decode_with_image_folder(root, folder, files, image_size):
    """Reads `root/folder` with `tfds.folder_dataset.ImageFolder`, images in `files` order."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    def decode_and_resize(example):
        raw = example["image"]
        image = tf.cond(
            tf.io.is_jpeg(raw),
            lambda: tf.io.decode_jpeg(raw, channels=3, dct_method="INTEGER_ACCURATE"),  # exact, as Pillow
            lambda: tf.io.decode_png(raw, channels=3),
        )
        return _tf_resize(image, image_size), tf.shape(image)[:2], example["image/filename"]

    builder = tfds.folder_dataset.ImageFolder(str(root))
    dataset = builder.as_dataset(split=folder, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    dataset = dataset.map(decode_and_resize, num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
    by_name, sizes = {}, set()
    try:
        for images, shapes, names in tfds.as_numpy(dataset):
            for image, (height, width), name in zip(images, shapes, names):
                by_name[name.decode()] = image
                sizes.add((int(width), int(height)))
    except tf.errors.OpError:
        bad = _first_unreadable(files)
        raise DataError(
            f"cannot read image {bad}; delete or replace it" if bad
            else f"TensorFlow could not decode an image under {root / folder}"
        ) from None
    return np.stack([by_name[f] for f in files]), sizes


def _tf_resize(image, image_size):
    """Antialiased bilinear resize (as Pillow's), skipped for images already of the size."""
    import tensorflow as tf

    def resize():
        resized = tf.image.resize(image, (image_size, image_size), antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    same = tf.reduce_all(tf.shape(image)[:2] == image_size)
    return tf.cond(same, lambda: image, resize)


def _first_unreadable(files):
    from PIL import Image

    for path in files:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception:  # noqa: BLE001 - any failure means "this file is bad"
            return path
    return None


# -- Pillow (no TensorFlow) ---------------------------------------------------


def _decode_with_pillow(files, image_size):
    from PIL import Image

    def read(path):
        try:
            with Image.open(path) as image:
                size = image.size
                image = image.convert("RGB")
                if image.size != (image_size, image_size):
                    image = image.resize((image_size, image_size), Image.BILINEAR, reducing_gap=None)
                return np.asarray(image, dtype=np.uint8), size
        except (OSError, SyntaxError, ValueError) as error:
            raise DataError(f"cannot read image {path} ({error}); delete or replace it") from None

    # Pillow releases the GIL while decoding, so threads do run in parallel.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        images, sizes = zip(*pool.map(read, files))
    return np.stack(images), set(sizes)


# -- tfds.load (downloads) ----------------------------------------------------


def _read_with_tfds_load(info, tfds_split, image_size):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "no --data-dir given and tensorflow-datasets is not installed: "
            "pass --data-dir DIR with image folders (see README, 'Data')"
        ) from None
    try:
        dataset, builder_info = tfds.load(info.tfds_name, split=tfds_split, as_supervised=True, with_info=True)
    except Exception as error:  # noqa: BLE001 - download/preparation failures vary
        raise DataError(
            f"tfds.load({info.tfds_name!r}) failed ({type(error).__name__}); "
            "offline? pass --data-dir DIR with image folders (see README, 'Data')"
        ) from None
    dataset = dataset.map(lambda image, label: (_tf_resize(image, image_size), label)).batch(1024)
    images, labels = zip(*tfds.as_numpy(dataset))
    return Split(
        np.concatenate(images),
        np.concatenate(labels).astype("int32"),
        builder_info.features["label"].names,
        f"tfds {info.tfds_name} {builder_info.version}",
    )


def balanced_subset(labels, per_class, seed):
    """Indices of `per_class` images of every class, drawn with a fixed seed, sorted.

    `per_class=None` keeps everything. Asking for more than a class has is
    an error, not a silent shortfall.
    """
    labels = np.asarray(labels)
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if per_class > len(members):
            raise DataError(f"asked for {per_class} images of class {label}, it has {len(members)}")
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))
