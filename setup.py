"""The build step pyproject.toml cannot say: record the git commit an installed copy is built from.

`pip install .` copies the package into site-packages, away from the clone's
.git, so at run time git can no longer tell which code runs. When the build
runs in a git checkout, this writes its commit (with "-dirty" where kerasrot/
or recipes/ differ from it) to kerasrot/BUILD_COMMIT in the built package;
`kerasrot.runner.reporting.git_commit` reads it. Editable installs run from
the clone and ask git directly.
"""

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def checkout_commit():
    """HEAD of the checkout this file is in, "-dirty" if the package's sources differ; None outside git."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != HERE:
            return None  # a copy inside some other repository
        dirty = git("status", "--porcelain", "--", "kerasrot", "recipes")
        return git("rev-parse", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


class BuildPyRecordingTheCommit(build_py):
    def run(self):
        super().run()
        commit = None if self.editable_mode else checkout_commit()
        if commit:
            Path(self.build_lib, "kerasrot", "BUILD_COMMIT").write_text(commit + "\n")


setup(cmdclass={"build_py": BuildPyRecordingTheCommit})
