"""Files: every write is atomic, and one run at a time owns a work directory.

A run can be killed at any moment (out of memory, a laptop lid, Ctrl-C).
Writing to a temporary file in the same folder and renaming it over the
target means a reader only ever sees the old complete file or the new
complete file, never half of one.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path


class WorkdirBusy(Exception):
    """Another run holds the work directory's lock."""


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renames it to `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())


def save_model(model, path):
    """`model.save(path)`, atomically (Keras writes `.keras` zips in place)."""
    with atomic_path(path) as tmp:
        model.save(tmp)


def remove_tree(path):
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def workdir_lock(workdir):
    """Holds an exclusive lock on `workdir` so two runs cannot share its checkpoints.

    `fcntl.flock` locks are released by the kernel when the process dies,
    so a killed run never leaves a stale lock behind.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    handle = open(workdir / "lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.close()
        if error.errno in (errno.EAGAIN, errno.EACCES):
            raise WorkdirBusy(
                f"another kerasrot run is using {workdir}; wait for it or pass another --workdir"
            ) from None
        raise
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
