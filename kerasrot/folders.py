"""Image folders: the one reader of images on disk, with Pillow.

Every image a run reads from disk comes through here: the offline copies of
the built-in datasets (`--data-dir DIR` reads `DIR/cifar10/train/<class>/*`)
and your own images (`--set rotation.dataset=folder:PATH`). A folder may be
nested any way and hold any format Pillow reads (JPEG, PNG, WebP, TIFF,
BMP, ...); files whose suffix is not an image format's, and hidden files and
folders, are left alone. Each image is decoded exactly (JPEG too) and
resized to the stage's `image_size` with antialiased bilinear filtering, as
`tfds.load`'s images are in `kerasrot.data`, so both give the same arrays.

Splits. If a folder has `train/` and `test/` (or `val/`) folders, those are
the splits. Otherwise one image in 20 is held out as the test split, chosen
by a hash of its path: the same images stay held out as the folder grows, so
rotation accuracies measured before and after are on the same images.

Labels: the first folder under the split names the class,
`PATH/train/<class>/.../x.jpg`. Rotation needs none: for it, the folder is
one class.

Unreadable files. Before anything is decoded, every image's header is read
(`scan`: 10 s for 100,000 files on 2 cores), so a file that is not a
readable image is found at once: it stops the run with its name
(`bad_images = "error"`, the default), or is left out, counted, named in
the log and recorded in metrics.json (`bad_images = "skip"`). A file whose
header reads but whose pixels are corrupt shows only when it is decoded; it
stops the run, with its name, in either mode.

Streaming. A split is read into memory, or stays on disk as `ImageFiles`
(`streaming = "on"`, or "auto" when the decoded images would take more than
a quarter of this machine's memory) and is read batch by batch.
"""

import dataclasses
import functools
import hashlib
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HELD_OUT = 20  # one image in HELD_OUT is a test image, where the folder has no test split
SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val")}
STREAM_ABOVE = 0.25  # "auto" streams splits whose decoded images exceed this share of memory


class DataError(Exception):
    """The data is missing or not what we expect; the message says what to do."""


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


# -- one image ------------------------------------------------------------------


@functools.cache  # a fact about the installed Pillow, the same all along
def image_suffixes():
    """Every file suffix Pillow can open (".jpg", ".png", ".webp", ...)."""
    from PIL import Image

    return frozenset(suffix for suffix, name in Image.registered_extensions().items() if name in Image.OPEN)


def read_image(path, image_size, draft=False, exif=False):
    """One image file as `[S, S, 3]` uint8 RGB, and its stored `(width, height)`.

    `draft=True` lets a large JPEG decode at 1/2, 1/4 or 1/8 of its size (no
    smaller than `image_size`) before the resize: a 12-megapixel photo then
    decodes many times faster, with slightly different pixels (your own
    folders, `folder:PATH`). `exif=True` turns the image as its EXIF
    orientation tag says, as a photo viewer shows it (`kerasrot predict`).
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            size = image.size
            if draft:
                image.draft("RGB", (image_size, image_size))
            if exif:
                image = ImageOps.exif_transpose(image)
            image = image.convert("RGB")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR, reducing_gap=None)
            return np.asarray(image, dtype=np.uint8), size
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot read image {path} ({error}); delete or replace it") from None


def read_images(paths, image_size, draft=False):
    """`[N, S, S, 3]` uint8 of many files, decoded in threads (Pillow releases the GIL while decoding)."""
    if not paths:
        return np.zeros((0, image_size, image_size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return np.stack([image for image, _ in pool.map(lambda path: read_image(path, image_size, draft), paths)])


class ImageFiles:
    """An array of images that stay on disk: `files[indices]` reads just those.

    It stands in for the `[N, S, S, 3]` uint8 array of a split wherever
    batches are made (`kerasrot.pipeline.Batches`), so a folder far larger
    than memory trains the same way: memory holds the file names (as bytes,
    relative to `root`) and the batches in flight, however many files there
    are. Each read decodes and resizes as a split read into memory does, so
    both give the same pixels.
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
        return read_images([self.path(i) for i in indices], self.image_size, self.draft)


# -- a folder ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FolderIndex:
    """What a folder holds: its readable images and the files that are not."""

    root: Path
    files: tuple  # readable images, paths relative to root, sorted
    bad: tuple  # (relative path, why) of files with an image suffix that Pillow cannot read
    formats: frozenset  # "JPEG", "PNG", ...
    smallest: tuple  # stored (width, height) of the smallest image
    largest: tuple
    fingerprint: str  # changes when any image file is added, removed or changed


def _listing(root):
    """Image files under `root` (relative, sorted), nested any way; hidden ones left out."""
    suffixes = image_suffixes()
    found = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found += [os.path.relpath(os.path.join(folder, n), root) for n in names
                  if not n.startswith(".") and os.path.splitext(n)[1].lower() in suffixes]
    return sorted(found)


def _header(path):
    """`(format, (width, height), size and time stamp)` from the file's header; `(None, why, ...)` if unreadable."""
    from PIL import Image

    stat = os.stat(path)
    stamp = f"{stat.st_size}\0{stat.st_mtime_ns}"
    try:
        with Image.open(path) as image:
            return image.format, image.size, stamp
    except Exception as error:  # noqa: BLE001 - any failure means "not a readable image"
        return None, f"{type(error).__name__}: {str(error)[:100]}", stamp


def scan(root, known=None, chunk=256):
    """Lists `root` and reads every image's header -> `FolderIndex`.

    `known`: a dict of the folders scanned before (a run keeps one, so its
    stages scan a folder once), looked up and filled by resolved path. What
    the scan keeps per file is its name; the headers are read `chunk` files
    at a time, so scanning a folder takes no more memory than its listing.
    """
    root = Path(root).expanduser().resolve()
    if known is not None and root in known:
        return known[root]
    if not root.is_dir():
        raise DataError(f"no folder {root}: expected a folder of images")
    listing = _listing(root)
    if not listing:
        raise DataError(f"no images under {root} (looked for {', '.join(sorted(image_suffixes())[:8])}, ...)")
    digest = hashlib.sha256()
    files, bad, formats = [], [], set()
    smallest = largest = None
    # Opening a file reads only its header; threads overlap the disk's waits.
    with ThreadPoolExecutor(max_workers=8) as pool:
        for start in range(0, len(listing), chunk):
            names = listing[start:start + chunk]
            for name, (kind, size_or_why, stamp) in zip(names, pool.map(_header, (root / n for n in names))):
                digest.update(f"{name}\0{stamp}\n".encode())
                if kind is None:
                    bad.append((name, size_or_why))
                    continue
                files.append(name)
                formats.add(kind)
                area = (size_or_why[0] * size_or_why[1], size_or_why)
                smallest, largest = min(smallest or area, area), max(largest or area, area)
    index = FolderIndex(root, tuple(files), tuple(bad), frozenset(formats),
                        (smallest or (0, (0, 0)))[1], (largest or (0, (0, 0)))[1], digest.hexdigest()[:12])
    if known is not None:
        known[root] = index
    return index


def split_folder(index, split):
    """The folder of `split` under the index's root ("train", "test" or "val"), or None where there is none."""
    layout = {s: next((f for f in names if (index.root / f).is_dir()), None) for s, names in SPLIT_FOLDERS.items()}
    return layout[split] if all(layout.values()) else None


def split_files(index, split):
    """The relative paths of `split`'s images and the folder their labels start under."""
    folder = split_folder(index, split)
    if folder:
        prefix = folder + os.sep
        return [f for f in index.files if f.startswith(prefix)], prefix
    held_out = [zlib.crc32(f.encode()) % HELD_OUT == 0 for f in index.files]
    return [f for f, test in zip(index.files, held_out) if test == (split == "test")], ""


def _labels(files, prefix, where):
    """Class of every file: the first folder under the split (`<class>/.../x.jpg`)."""
    parts = [f[len(prefix):].split(os.sep) for f in files]
    loose = [f for f, p in zip(files, parts) if len(p) == 1]
    if loose:
        raise DataError(f"{where}/{loose[0][len(prefix):]} is in no class folder: a labelled folder holds "
                        f"{where}/<class>/<image> (rotation needs no labels)")
    class_names = sorted({p[0] for p in parts})
    if len(class_names) < 2:
        raise DataError(f"{where} has {len(class_names)} class folder; classifying needs two or more")
    lookup = {name: i for i, name in enumerate(class_names)}
    return np.asarray([lookup[p[0]] for p in parts], dtype="int32"), class_names


def describe_bad(index, limit=3):
    shown = ", ".join(f"{index.root / f} ({why})" for f, why in index.bad[:limit])
    return shown + (f" and {len(index.bad) - limit} more" if len(index.bad) > limit else "")


def size_range(sizes):
    """`{(96, 96)}` -> "96x96"; several sizes -> "32x32 to 500x375"."""
    sizes = sorted(sizes, key=lambda s: (s[0] * s[1], s))
    names = [f"{w}x{h}" for w, h in (sizes[0], sizes[-1])]
    return names[0] if names[0] == names[1] else f"{names[0]} to {names[1]}"


def read_split(index, split, image_size, labelled=True, streaming=False, bad_images="error", draft=False):
    """`split` ("train" or "test") of the scanned folder `index` as a `Split`, in memory or streamed."""
    if index.bad and bad_images != "skip":
        raise DataError(f"{len(index.bad)} unreadable image file(s): {describe_bad(index)}; delete or replace "
                        "them, or leave them out with --set TASK.bad_images=skip")
    files, prefix = split_files(index, split)
    where = str(index.root / prefix.rstrip(os.sep)) if prefix else str(index.root)
    if not files and prefix:
        raise DataError(f"{where} holds no images")
    if not files:
        raise DataError(f"{where} holds no {split} images: with {len(index.files)} images and no "
                        f"{index.root}/train and /test folders, one in {HELD_OUT} is held out for testing")
    if labelled:
        labels, class_names = _labels(files, prefix, where)
    else:
        labels, class_names = np.zeros(len(files), dtype="int32"), ["images"]
    images = ImageFiles(index.root, files, image_size, draft)
    if not streaming:
        images = images[np.arange(len(images))]
    skipped = f", {len(index.bad)} unreadable left out" if index.bad else ""
    source = (f"image folder {index.root} ({len(index.files)} images{skipped}, {'/'.join(sorted(index.formats))}, "
              f"stored {size_range({index.smallest, index.largest})}){', streamed from disk' if streaming else ''}")
    return Split(images, labels, class_names, source, skipped=index.bad)


def needs_streaming(index, image_size):
    """Whether the folder's decoded images would take more than `STREAM_ABOVE` of the memory."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return len(index.files) * image_size * image_size * 3 > STREAM_ABOVE * memory
