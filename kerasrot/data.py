"""Data: datasets as uint8 images and int labels, in memory or read from disk.

A dataset is named by a stage's `dataset` setting:

* `cifar10` or `imagenette`: the reports' datasets. Small enough to hold in
  memory (CIFAR-10 is 150 MB), so every split is read once into arrays and
  `kerasrot.pipeline` makes batches from there. Two ways in:
  `tfds.load(name)` downloads and prepares the dataset (needs internet);
  `--data-dir DIR` reads image folders, `DIR/<dataset>/<split>/<class>/*.jpg`
  (or .jpeg, .png), offline, with `tfds.folder_dataset.ImageFolder`.
* `tfds:NAME`: any other TensorFlow Datasets name, e.g. `tfds:stl10`, read
  with tfds into memory (downloads).
* `folder:PATH`: your own images, any folder of them (`kerasrot.folders`).
  Folders larger than memory are streamed: `ImageFiles` below is an array of
  images that reads each one from disk when a batch asks for it.

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
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FOLDER, TFDS = "folder:", "tfds:"  # the prefixes of `dataset` names that are not in DATASETS


class DataError(Exception):
    """The data is missing or not what we expect; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    tfds_name: str
    splits: dict  # our split name -> (image folder name, tfds split name)
    sizes: dict  # our split name -> its images
    num_classes: int = 10
    per_class: dict = dataclasses.field(default_factory=dict)  # split -> images of every class, where all are alike


DATASETS = {
    "cifar10": DatasetInfo("cifar10", {"train": ("train", "train"), "test": ("test", "test")},
                           {"train": 50000, "test": 10000}, per_class={"train": 5000, "test": 1000}),
    "imagenette": DatasetInfo("imagenette/160px-v2", {"train": ("train", "train"), "test": ("val", "validation")},
                              {"train": 9469, "test": 3925}),
}


@dataclasses.dataclass
class Split:
    """One split of a dataset: `images` `[N, S, S, 3]` uint8, `labels` `[N]` int32.

    `images` is a NumPy array, or `ImageFiles` when the split is streamed
    from disk; both give a `[n, S, S, 3]` array when indexed with indices.
    """

    images: "np.ndarray | ImageFiles"
    labels: np.ndarray
    class_names: list
    source: str  # where it was read from, for the provenance of results
    skipped: tuple = ()  # unreadable files left out (`bad_images = "skip"`), with why

    def __len__(self):
        return len(self.labels)

    def subset(self, indices):
        images = self.images.subset(indices) if isinstance(self.images, ImageFiles) else self.images[indices]
        return Split(images, self.labels[indices], self.class_names, self.source, self.skipped)


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


@functools.lru_cache(maxsize=8)
def load_split(dataset, split, image_size, data_dir=None, labelled=True, streaming=False, bad_images="error"):
    """Reads a split, into memory or as `ImageFiles` (memoised: the stages of a run share it).

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
    """
    if dataset.startswith(FOLDER):
        from kerasrot import folders  # builds on this module

        return folders.load_split(dataset[len(FOLDER):], split, image_size, labelled, streaming, bad_images)
    if dataset.startswith(TFDS):
        _no_streaming(streaming, dataset)
        name = dataset[len(TFDS):]
        return _read_with_tfds_load(name, split, image_size, labelled)
    info = dataset_info(dataset)
    folder, tfds_split = info.splits[split]
    if data_dir is None:
        _no_streaming(streaming, dataset)
        return _read_with_tfds_load(info.tfds_name, tfds_split, image_size, labelled)
    root = Path(data_dir).expanduser() / dataset
    files, labels, class_names = list_image_folder(root / folder)
    if len(class_names) != info.num_classes:
        raise DataError(f"{root / folder} has {len(class_names)} class folders, {dataset} has {info.num_classes}")
    formats = "/".join(sorted({Path(f).suffix.lstrip(".").upper().replace("JPG", "JPEG") for f in files}))
    if streaming:
        images = ImageFiles(root / folder, [os.path.relpath(f, root / folder) for f in files], image_size)
        return Split(images, labels, class_names, f"image folder {root} ({formats}), streamed from disk")
    if importlib.util.find_spec("tensorflow") is not None:
        images, sizes = _decode_with_image_folder(root, folder, files, image_size)
    else:
        images, sizes = _decode_with_pillow(files, image_size)
    return Split(images, labels, class_names, f"image folder {root} ({formats}, stored {size_range(sizes)})")


def _no_streaming(streaming, dataset):
    if streaming:
        raise DataError(f"{dataset} is read with tfds, into memory; streaming reads image folders: "
                        "pass --data-dir DIR, or use folder:PATH")


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


def is_whole_split(dataset, split, per_class, data_dir=None):
    """Whether `per_class` images of every class are the whole split of a built-in dataset.

    Known as published (`DATASETS`); a folder copy under `data_dir` is
    counted as well, so a partial copy is not whole.
    """
    info = DATASETS.get(dataset)
    if per_class is None or info is None or info.per_class.get(split) != per_class:
        return False
    if data_dir is None:
        return True
    folder = Path(data_dir).expanduser() / dataset / info.splits[split][0]
    return _class_counts(folder) == (per_class,) * info.num_classes


@functools.lru_cache(maxsize=8)
def _class_counts(top):
    try:
        _, labels, class_names = list_image_folder(top)
    except DataError:
        return ()
    return tuple(np.bincount(labels, minlength=len(class_names)).tolist())


def size_range(sizes):
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


# -- Pillow (no TensorFlow, and streaming) ------------------------------------


def read_image(path, image_size, draft=False):
    """One image file as `[S, S, 3]` uint8 RGB, and its stored `(width, height)`.

    `draft=True` lets a large JPEG decode at 1/2, 1/4 or 1/8 of its size (no
    smaller than `image_size`) before the resize: a 12-megapixel photo then
    decodes many times faster, with slightly different pixels (folder:PATH
    datasets only, in memory and streamed alike).
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            size = image.size
            if draft:
                image.draft("RGB", (image_size, image_size))
            image = image.convert("RGB")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR, reducing_gap=None)
            return np.asarray(image, dtype=np.uint8), size
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read image {path} ({error}); delete or replace it") from None


def _read_images(paths, image_size, draft=False):
    """`read_image` of many files, in threads: Pillow releases the GIL while decoding."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(lambda path: read_image(path, image_size, draft), paths))


def _decode_with_pillow(files, image_size):
    images, sizes = zip(*_read_images(files, image_size))
    return np.stack(images), set(sizes)


class ImageFiles:
    """An array of images that stay on disk: `files[indices]` reads just those.

    It stands in for the `[N, S, S, 3]` uint8 array of a split wherever
    batches are made (`kerasrot.pipeline.Batches`), so a folder far larger
    than memory trains the same way: memory holds the file names (as bytes,
    relative to `root`) and the batches in flight, however many files there
    are. Each read decodes and resizes with Pillow, as the in-memory readers
    do, so a streamed split gives the same pixels as the same split in memory.
    """

    dtype = np.dtype("uint8")

    def __init__(self, root, relative_paths, image_size, draft=False):
        self.root, self.image_size, self.draft = Path(root), image_size, draft
        self.paths = np.asarray([os.fsencode(p) for p in relative_paths], dtype=bytes)

    def __len__(self):
        return len(self.paths)

    @property
    def shape(self):
        return (len(self), self.image_size, self.image_size, 3)

    def subset(self, indices):
        files = ImageFiles(self.root, [], self.image_size, self.draft)
        files.paths = self.paths[indices]
        return files

    def path(self, index):
        return self.root / os.fsdecode(self.paths[index])

    def __getitem__(self, indices):
        indices = np.asarray(indices)
        if indices.ndim == 0:
            return read_image(self.path(indices), self.image_size, self.draft)[0]
        if len(indices) == 0:
            return np.zeros((0, *self.shape[1:]), dtype=self.dtype)
        images = _read_images([self.path(i) for i in indices], self.image_size, self.draft)
        return np.stack([image for image, _ in images])


# -- tfds.load (downloads) ----------------------------------------------------


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
