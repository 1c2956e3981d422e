"""Provenance: how a result was made, recorded beside it.

Every result records the command, backend, machine, data, package versions
and, first of all, the commit whose code ran, so that anyone can make it
again. From a clone (or an editable install) git says which commit; an
installed copy names the commit it was built from (setup.py writes it); a
copy of the tree without its .git (a lent GPU machine) names it through a
manifest made where the commit is.
"""

import hashlib
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from kerasrot import __version__

PACKAGES = ("kerasrot", "keras", "torch", "jax", "tensorflow", "tensorflow-cpu", "tensorflow-datasets", "numpy")

# Results depend on the package and the recipes only: changes elsewhere
# (tests, benchmarks, docs) do not make a result irreproducible.
SOURCE_FOLDERS = ("kerasrot", "recipes")
# A copy of the tree on another machine (a lent GPU machine) may have no .git,
# or one still at the commit its session started from, which calls the copy
# "-dirty". Such a machine names its commit through a manifest made where the
# commit is: its first line, then `git ls-files -s -- kerasrot recipes`
# (benchmarks/gpu_session.sh prepare). Set, it wins over git.
MANIFEST_VARIABLE = "KERASROT_COMMIT_MANIFEST"
BUILD_COMMIT = "BUILD_COMMIT"  # in an installed package: the commit it was built from (setup.py)


def git_commit():
    """The commit whose code runs, with "-dirty" if kerasrot/ or recipes/ differ from it.

    From a clone (or an editable install) git says; an installed copy names
    the commit it was built from (`BUILD_COMMIT`, written by setup.py).
    """
    root = Path(__file__).resolve().parents[2]
    if os.environ.get(MANIFEST_VARIABLE):
        return commit_from_manifest(root, os.environ[MANIFEST_VARIABLE])
    built = root / "kerasrot" / BUILD_COMMIT
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        if Path(top).resolve() != root:  # site-packages inside some repository (a .venv in the clone)
            raise subprocess.CalledProcessError(1, "git")
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *(f":/{folder}" for folder in SOURCE_FOLDERS)],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        if built.exists():
            return f"{built.read_text().strip()} (installed kerasrot {__version__})"
        return f"unknown (installed kerasrot {__version__}, not built from a git checkout)"
    return commit + ("-dirty" if dirty else "")


def commit_from_manifest(root, manifest):
    """The manifest's commit, "-dirty" unless every source file has the blob hash git recorded.

    Git names a file's content by sha1(b"blob <size>\\0" + content) (a link's
    content is its target), so the check needs no git, only the files.
    """
    lines = Path(manifest).read_text().splitlines()
    commit, recorded = lines[0].strip(), {}
    for line in lines[1:]:
        fields, name = line.split("\t", 1)  # "<mode> <blob> <stage>\t<path>"
        recorded[name] = fields.split()[1]
    found = {name: _blob_hash(root / name) for name in _source_files(root)}
    return commit + ("" if found == recorded else "-dirty")


def _source_files(root):
    """Every file and link under SOURCE_FOLDERS, as git would list them (no caches)."""
    for folder in SOURCE_FOLDERS:
        for directory, folders, names in os.walk(root / folder):
            links = [name for name in folders if os.path.islink(os.path.join(directory, name))]
            folders[:] = [name for name in folders if name != "__pycache__" and name not in links]
            for name in names + links:
                if not name.endswith(".pyc"):
                    yield Path(directory, name).relative_to(root).as_posix()


def _blob_hash(path):
    content = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def package_versions():
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def record(command, backend_name, device, data_source, wall_seconds, settings, commit, devices="1 device"):
    """How a result was made. `devices`: those that shared each batch (`kerasrot.runner.distribute`)."""
    return {
        "command": command,
        "backend": backend_name,
        "device": device,
        "devices": devices,
        "data": data_source,
        "commit": commit,
        "packages": package_versions(),
        "wall_seconds": round(wall_seconds, 1),
        **{key: sorted({s[key] for s in settings if key in s})  # probe stages have none of them
           for key in ("pipeline", "precision", "data_format", "fused_batchnorm", "channels_last_kernels")},
        "platform": f"{platform.system()} {platform.machine()}, {sys.implementation.name}",
    }
