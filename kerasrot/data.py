"""Data: CIFAR-10 and ImageNette as NumPy arrays of uint8 images and int labels.

Both datasets are small enough to hold in memory (CIFAR-10 is 150 MB), so
every split is read once into arrays and the pipelines (`kerasrot.pipeline`)
work from there. Three ways in:

* `tfds.load(name)`: downloads and prepares the dataset (needs internet);
  used when no data directory is given.
* `DATA_DIR/<dataset>/<split>/<class>/*.jpg|png` read by
  `tfds.folder_dataset.ImageFolder`, offline.
* the same folders read with Pillow where TensorFlow is not installed
  (the lent GPU machines have none).

Whatever reads them, images come out in one canonical order (sorted file
paths), converted to RGB (grayscale and PNG work) and resized to the
model's input size, so both readers give the same arrays.
"""

import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DataError(Exception):
    """The data is missing or not what we expect; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    tfds_name: str
    folders: dict  # our split name -> folder / tfds split name
    tfds_splits: dict
    num_classes: int = 10


DATASETS = {
    "cifar10": DatasetInfo(
        "cifar10", "cifar10", {"train": "train", "test": "test"}, {"train": "train", "test": "test"}
    ),
    "imagenette": DatasetInfo(
        "imagenette",
        "imagenette/160px-v2",
        {"train": "train", "test": "val"},
        {"train": "train", "test": "validation"},
    ),
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
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def default_data_dir():
    """`KERASROT_DATA_DIR` if set, else None (download with tfds)."""
    return os.environ.get("KERASROT_DATA_DIR") or None


def default_reader():
    """`tfds` (ImageFolder) where TensorFlow is installed, else `pillow`."""
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        return "pillow"
    return "tfds"


@functools.lru_cache(maxsize=8)
def load_split(dataset, split, image_size, data_dir=None, reader="auto"):
    """Reads a whole split into memory (memoised: stages of a run share it).

    Args:
        dataset: "cifar10" or "imagenette".
        split: "train" or "test" (ImageNette's "val").
        image_size: images are resized to `image_size x image_size`.
        data_dir: folder holding `<dataset>/<split>/<class>/` image folders;
            None downloads with `tfds.load`.
        reader: "pillow", "tfds" or "auto" (`default_reader()`), for image folders.
    """
    info = dataset_info(dataset)
    reader = default_reader() if reader == "auto" else reader
    if data_dir is None:
        return _read_with_tfds_load(info, split, image_size)
    root = Path(data_dir).expanduser() / info.name
    files, labels, class_names = list_image_folder(root, info.folders[split])
    if len(class_names) != info.num_classes:
        raise DataError(
            f"{root / info.folders[split]} has {len(class_names)} class folders, "
            f"{info.name} has {info.num_classes}"
        )
    if reader == "tfds":
        images = _decode_with_tfds(root, info.folders[split], files, image_size)
    else:
        images = _decode_with_pillow(files, image_size)
    return Split(images, labels, class_names, f"image folder {root}")


def list_image_folder(root, split_folder):
    """Sorted image paths, their labels and the class names of `root/split_folder/`."""
    top = Path(root) / split_folder
    if not top.is_dir():
        raise DataError(
            f"no folder {top}: expected images as {Path(root)}/{split_folder}/<class>/<image>.jpg "
            "(see README, 'Data')"
        )
    class_names = sorted(p.name for p in top.iterdir() if p.is_dir())
    if not class_names:
        raise DataError(f"{top} has no class folders: expected {top}/<class>/<image>.jpg")
    files, labels = [], []
    for label, name in enumerate(class_names):
        images = sorted(
            str(p) for p in (top / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not images:
            raise DataError(f"class folder {top / name} holds no .jpg, .jpeg or .png images")
        files += images
        labels += [label] * len(images)
    return files, np.asarray(labels, dtype="int32"), class_names


def _decode_with_pillow(files, image_size):
    from PIL import Image

    def read(path):
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if image.size != (image_size, image_size):
                    image = image.resize((image_size, image_size), Image.BILINEAR, reducing_gap=None)
                return np.asarray(image, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError) as error:
            raise DataError(f"cannot read image {path} ({error}); delete or replace it") from None

    # Pillow releases the GIL while decoding, so threads do run in parallel.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return np.stack(list(pool.map(read, files)))


def _decode_with_tfds(root, split_folder, files, image_size):
    """Decodes with `tfds.folder_dataset.ImageFolder`, then puts images in `files` order."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = tfds.folder_dataset.ImageFolder(str(root))
    # We decode ourselves: TensorFlow's default JPEG decoder (a fast, inexact
    # IDCT) differs from Pillow by a few gray levels; the accurate one
    # gives the same pixels, so both readers make the same arrays.
    dataset = builder.as_dataset(
        split=split_folder, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
    )
    dataset = dataset.map(
        lambda ex: (_tf_resize(_tf_decode(ex["image"]), image_size), ex["image/filename"]),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    by_name = {}
    try:
        for images, names in tfds.as_numpy(dataset.batch(1024)):
            for image, name in zip(images, names):
                by_name[name.decode()] = image
    except tf.errors.OpError:
        bad = _first_unreadable(files)
        raise DataError(
            f"cannot read image {bad}; delete or replace it" if bad else
            f"TensorFlow could not decode an image under {root / split_folder}"
        ) from None
    return np.stack([by_name[f] for f in files])


def _tf_decode(raw):
    import tensorflow as tf

    return tf.cond(
        tf.io.is_jpeg(raw),
        lambda: tf.io.decode_jpeg(raw, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_png(raw, channels=3),
    )


def _tf_resize(image, image_size):
    """Antialiased bilinear resize, skipped for images already of the size."""
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


def _read_with_tfds_load(info, split, image_size):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "no --data-dir given and tensorflow-datasets is not installed: "
            "pass --data-dir DIR with image folders (see README, 'Data')"
        ) from None
    try:
        dataset, builder_info = tfds.load(
            info.tfds_name, split=info.tfds_splits[split], as_supervised=True, with_info=True
        )
    except Exception as error:  # noqa: BLE001 - download/preparation failures vary
        raise DataError(
            f"tfds.load({info.tfds_name!r}) failed ({type(error).__name__}); "
            "offline? pass --data-dir DIR with image folders (see README, 'Data')"
        ) from None
    dataset = dataset.map(lambda image, label: (_tf_resize(image, image_size), label))
    images, labels = [], []
    for image_batch, label_batch in tfds.as_numpy(dataset.batch(1024)):
        images.append(image_batch)
        labels.append(label_batch)
    class_names = builder_info.features["label"].names
    return Split(
        np.concatenate(images),
        np.concatenate(labels).astype("int32"),
        class_names,
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
