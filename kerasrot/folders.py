"""Your own images: any folder of them, for rotation pretraining or as labelled data.

`--set rotation.dataset=folder:PATH` pretrains on every image under PATH:
nested any way, of any size, in any format Pillow reads (JPEG, PNG, WebP,
TIFF, BMP, ...), with no labels: the rotation task makes its own. Every
image is resized to the stage's `image_size`. Files whose suffix is not an
image format's, and hidden files and folders, are left alone.

Splits. If PATH has `train/` and `test/` (or `val/`) folders, those are the
splits. Otherwise one image in 20 is held out as the test split, chosen by
a hash of its path: the same images stay held out as the folder grows, so
rotation accuracies measured before and after are on the same images.

Labels, for classification on a folder (`--set classify.dataset=folder:PATH`):
the first folder under the split names the class, `PATH/train/<class>/.../x.jpg`.
Rotation ignores them: for it, the folder is one class.

Unreadable files. Before training, every image's header is read (10 s for
100,000 files on 2 cores, without decoding), so a file that is not a readable
image is found at once: it stops the run with its name
(`bad_images = "error"`, the default), or is left out, counted, named in
the log and recorded in metrics.json (`bad_images = "skip"`). A file whose
header reads but whose pixels are corrupt shows only when it is decoded;
it stops the run, with its name, in either mode.

Streaming. With `streaming = "on"` (or "auto", when the decoded images would
take more than a quarter of this machine's memory) a split stays on disk as
`kerasrot.data.ImageFiles` and is read batch by batch.
"""

import dataclasses
import functools
import hashlib
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kerasrot.data import DataError, ImageFiles, Split, size_range

HELD_OUT = 20  # one image in HELD_OUT is a test image, where the folder has no test split
SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val")}
STREAM_ABOVE = 0.25  # "auto" streams splits whose decoded images exceed this share of memory


@functools.cache
def image_suffixes():
    """Every file suffix Pillow can open (".jpg", ".png", ".webp", ...)."""
    from PIL import Image

    return frozenset(suffix for suffix, name in Image.registered_extensions().items() if name in Image.OPEN)


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


def scan(root):
    """Lists `root` and reads every image's header, once per folder however its path is written."""
    return _scan(Path(root).expanduser().resolve())


@functools.lru_cache(maxsize=8)
def _scan(root, chunk=256):
    """`scan` of a resolved path (memoised: the stages of a run share it).

    What it keeps per file is its name; the headers are read `chunk` files
    at a time, so scanning a folder takes no more memory than its listing.
    """
    if not root.is_dir():
        raise DataError(f"no folder {root}: folder:PATH needs a folder of images")
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
    return FolderIndex(root, tuple(files), tuple(bad), frozenset(formats),
                       (smallest or (0, (0, 0)))[1], (largest or (0, (0, 0)))[1], digest.hexdigest()[:12])


def _split_files(index, split):
    """The relative paths of `split`'s images and the folder their labels start under."""
    layout = {s: next((f for f in names if (index.root / f).is_dir()), None) for s, names in SPLIT_FOLDERS.items()}
    if all(layout.values()):
        prefix = layout[split] + os.sep
        return [f for f in index.files if f.startswith(prefix)], prefix
    held_out = [zlib.crc32(f.encode()) % HELD_OUT == 0 for f in index.files]
    return [f for f, test in zip(index.files, held_out) if test == (split == "test")], ""


def _labels(files, prefix, where):
    """Class of every file: the first folder under the split (`<class>/.../x.jpg`)."""
    parts = [f[len(prefix):].split(os.sep) for f in files]
    loose = [f for f, p in zip(files, parts) if len(p) == 1]
    if loose:
        raise DataError(f"{where}/{loose[0]} is in no class folder: a labelled folder holds "
                        f"{where}/<class>/<image> (rotation needs no labels)")
    class_names = sorted({p[0] for p in parts})
    if len(class_names) < 2:
        raise DataError(f"{where} has {len(class_names)} class folder; classifying needs two or more")
    lookup = {name: i for i, name in enumerate(class_names)}
    return np.asarray([lookup[p[0]] for p in parts], dtype="int32"), class_names


def describe_bad(index, limit=3):
    shown = ", ".join(f"{index.root / f} ({why})" for f, why in index.bad[:limit])
    return shown + (f" and {len(index.bad) - limit} more" if len(index.bad) > limit else "")


def load_split(path, split, image_size, labelled, streaming, bad_images):
    """`split` ("train" or "test") of the folder `path` as a `kerasrot.data.Split`."""
    index = scan(path)
    if index.bad and bad_images != "skip":
        raise DataError(f"{len(index.bad)} unreadable image file(s): {describe_bad(index)}; delete or replace "
                        "them, or leave them out with --set TASK.bad_images=skip")
    files, prefix = _split_files(index, split)
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
    images = ImageFiles(index.root, files, image_size, draft=True)  # photos: decode large JPEGs reduced
    if not streaming:
        images = images[np.arange(len(images))]
    skipped = f", {len(index.bad)} unreadable left out" if index.bad else ""
    source = (f"image folder {index.root} ({len(index.files)} images{skipped}, {'/'.join(sorted(index.formats))}, "
              f"stored {size_range({index.smallest, index.largest})}){', streamed from disk' if streaming else ''}")
    return Split(images, labels, class_names, source, skipped=index.bad)


def needs_streaming(path, image_size):
    """Whether the folder's decoded images would take more than `STREAM_ABOVE` of the memory."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return len(scan(path).files) * image_size * image_size * 3 > STREAM_ABOVE * memory
