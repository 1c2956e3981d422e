"""Data: datasets as uint8 images and int labels, in memory or read from disk.

A dataset is named by a stage's `dataset` setting:

* `cifar10` or `imagenette`: the reports' datasets. Small enough to hold in
  memory (CIFAR-10 is 150 MB), so every split is read once into arrays and
  `kerasrot.pipeline` makes batches from there. Two ways in:
  `tfds.load(name)` downloads and prepares the dataset (needs internet);
  `--data-dir DIR` reads image folders, `DIR/<dataset>/<split>/<class>/*.jpg`,
  offline, with the image folder reader (`kerasrot.folders`).
* `tfds:NAME`: any other TensorFlow Datasets name, e.g. `tfds:stl10`, read
  with tfds into memory (downloads).
* `folder:PATH`: your own images, any folder of them (`kerasrot.folders`),
  in memory or streamed from disk batch by batch.

Whichever way a split comes in, it is a `Split` (`kerasrot.folders`): the
images, their labels, the class names and where they were read from. The
two readers resize alike (antialiased bilinear) and decode JPEG exactly, so
a dataset read with `tfds.load` and its image folder copy give the same
arrays (tests/test_data.py).
"""

import dataclasses
import re
from pathlib import Path

import numpy as np

from kerasrot import folders
from kerasrot.folders import DataError, Split  # noqa: F401 - part of this module's interface

FOLDER, TFDS = "folder:", "tfds:"  # the prefixes of `dataset` names that are not in DATASETS


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    tfds_name: str
    tfds_splits: dict  # our split name -> tfds' split name
    sizes: dict  # our split name -> its images
    class_names: tuple
    title: str  # as tables and plots name it


DATASETS = {
    "cifar10": DatasetInfo("cifar10", {"train": "train", "test": "test"}, {"train": 50000, "test": 10000},
                           ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"), "CIFAR-10"),
    "imagenette": DatasetInfo("imagenette/160px-v2", {"train": "train", "test": "validation"},
                              {"train": 9469, "test": 3925},
                              ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916",
                               "n03417042", "n03425413", "n03445777", "n03888257"), "ImageNette"),
}


def dataset_info(name):
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def check_dataset_name(name):
    """Raises DataError unless `name` is a known dataset, `folder:PATH` or `tfds:NAME`."""
    prefix = next((p for p in (FOLDER, TFDS) if name.startswith(p)), None)
    if prefix and name[len(prefix):].strip():
        return
    if prefix is None and name in DATASETS:
        return
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, "
                    f"{FOLDER}PATH (your own images) or {TFDS}NAME (a TensorFlow Datasets name)")


def dataset_tag(name):
    """A short name fit for a Keras model name: "cifar10", "folder", "tfds_stl10"."""
    if name.startswith(FOLDER):
        return "folder"
    return re.sub(r"[^A-Za-z0-9_]", "_", name.replace(TFDS, "tfds_"))


def load_split(dataset, split, image_size, data_dir=None, labelled=True, streaming=False, bad_images="error",
               scans=None):
    """Reads a split, into memory or streamed from disk (`kerasrot.folders.ImageFiles`).

    Args:
        dataset: "cifar10", "imagenette", "folder:PATH" or "tfds:NAME".
        split: "train" or "test" (ImageNette's "val").
        image_size: images are resized to `image_size x image_size`.
        data_dir: folder holding `<dataset>/<split>/<class>/` image folders;
            None downloads with `tfds.load`. (Not used by `folder:` and `tfds:`.)
        labelled: False for rotation, which needs no labels: an own folder
            is then one class, whatever its subfolders are.
        streaming: read images from disk batch by batch instead of into memory.
        bad_images: "error" stops at an unreadable file, "skip" leaves it out
            (image folders only; tfds data is checked when prepared).
        scans: the folders scanned before, by path (`kerasrot.folders.scan`):
            a run passes one dict to all its reads, so each folder is listed once.
    """
    if dataset.startswith(FOLDER):  # photos: large JPEGs decode reduced (`draft`)
        index = folders.scan(dataset[len(FOLDER):], known=scans)
        return folders.read_split(index, split, image_size, labelled, streaming, bad_images, draft=True)
    if dataset.startswith(TFDS):
        _no_streaming(streaming, dataset)
        return _read_with_tfds_load(dataset[len(TFDS):], split, image_size, labelled)
    info = dataset_info(dataset)
    if data_dir is None:
        _no_streaming(streaming, dataset)
        return _read_with_tfds_load(info.tfds_name, info.tfds_splits[split], image_size, labelled)
    return _read_dataset_folder(dataset, info, Path(data_dir).expanduser() / dataset, split, image_size,
                                streaming, bad_images, scans)


def _read_dataset_folder(dataset, info, root, split, image_size, streaming, bad_images, scans):
    """A built-in dataset's split from its image folder copy, `root/<split>/<class>/*`, with its classes checked."""
    index = folders.scan(root, known=scans)
    folder = folders.split_folder(index, split)
    if folder is None:  # both splits' folders must be there, or every image would be one split
        missing = next(names for names in folders.SPLIT_FOLDERS.values() if not any((root / n).is_dir() for n in names))
        expected = " or ".join(f"{root}/{name}" for name in missing)
        raise DataError(f"no folder {expected}: expected images as {root}/<split>/<class>/<image>.jpg "
                        "(see README, 'Data')")
    read = folders.read_split(index, split, image_size, True, streaming, bad_images)
    empty = sorted(p.name for p in (root / folder).iterdir()
                   if p.is_dir() and not p.name.startswith(".") and p.name not in read.class_names)
    if empty:
        raise DataError(f"class folder {root / folder / empty[0]} holds no images")
    if len(read.class_names) != len(info.class_names):
        raise DataError(f"{root / folder} has {len(read.class_names)} class folders, "
                        f"{dataset} has {len(info.class_names)}")
    stored = "" if streaming else f", stored {folders.size_range({index.smallest, index.largest})}"
    how = ", streamed from disk" if streaming else ""
    read.source = f"image folder {root} ({'/'.join(sorted(index.formats))}{stored}){how}"
    return read


# A caveat that every result made from this copy must carry (reporting puts it below the table).
JPEG_CAVEAT = ("CIFAR-10 was read from JPEG files, a lossy copy of its original pixels: "
               "accuracies can differ slightly from the original dataset's.")


def caveats(source):
    """What a result made from data read from `source` (a `Split.source`) must say about that data."""
    return [JPEG_CAVEAT] if "cifar10 (JPEG" in source else []


def _no_streaming(streaming, dataset):
    if streaming:
        raise DataError(f"{dataset} is read with tfds, into memory; streaming reads image folders: "
                        "pass --data-dir DIR, or use folder:PATH")


def _tf_resize(image, image_size):
    """Antialiased bilinear resize (as the image folder reader's), skipped for images already of the size."""
    import tensorflow as tf

    def resize():
        resized = tf.image.resize(image, (image_size, image_size), antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    same = tf.reduce_all(tf.shape(image)[:2] == image_size)
    return tf.cond(same, lambda: image, resize)


def _read_with_tfds_load(name, split, image_size, labelled=True):
    """A tfds dataset's split, as `tfds.load` gives it, in memory.

    `split` is tfds' split name; for `tfds:NAME` datasets it is ours,
    "train" or "test", and "test" falls back to "validation" for datasets
    without a test split. Unlabelled data (`labelled=False`) need no
    "label" feature.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "no --data-dir given and tensorflow-datasets is not installed: "
            "pass --data-dir DIR with image folders (see README, 'Data')"
        ) from None
    try:  # tfds.load's own steps, taken one by one to check the split's name before reading it
        builder = tfds.builder(name)
        builder.download_and_prepare()
    except Exception as error:  # noqa: BLE001 - unknown names, download/preparation failures vary
        raise DataError(
            f"tfds.load({name!r}) failed ({type(error).__name__}: {str(error).splitlines()[0][:120]}); "
            "offline? pass --data-dir DIR with image folders (see README, 'Data')"
        ) from None
    features = builder.info.features
    if "image" not in features:
        raise DataError(f"tfds dataset {name} has no 'image' feature (it has {', '.join(features)})")
    has_labels = "label" in features
    if labelled and not has_labels:
        raise DataError(f"tfds dataset {name} has no 'label' feature: use it for rotation pretraining only")
    splits = set(builder.info.splits)  # empty under tfds.testing.mock_data
    if split == "test" and splits and "test" not in splits:
        split = "validation"
    if splits and split not in splits:
        raise DataError(f"tfds dataset {name} has no {split!r} split (it has {', '.join(sorted(splits))})")

    def image_and_label(example):
        label = example["label"] if has_labels else 0
        return _tf_resize(example["image"], image_size), label

    dataset = builder.as_dataset(split=split).map(image_and_label).batch(1024)
    images, labels = zip(*tfds.as_numpy(dataset))
    class_names = features["label"].names if has_labels else ["images"]
    return Split(
        np.concatenate(images),
        np.concatenate(labels).astype("int32") if labelled else np.zeros(sum(map(len, labels)), "int32"),
        class_names,
        f"tfds {name} {builder.info.version}",
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
