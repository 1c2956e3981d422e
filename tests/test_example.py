"""The keras.io-style walkthrough runs, on the current backend, and stays a plain Keras example."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "rotnet_table2.py"


def test_tiny_walkthrough_prints_the_three_accuracies(data_root, tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--tiny", "--data-dir", str(data_root)],
        cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for line in ("rotation accuracy", "final block + head from rotation weights",
                 "final block + head from random weights"):
        assert re.search(rf"^{re.escape(line)}: \d+\.\d\d%$", done.stdout, re.MULTILINE), line
    assert (tmp_path / "rotnet_table2.png").stat().st_size > 0
    assert (tmp_path / "rotations.png").stat().st_size > 0
    assert (tmp_path / "attention.png").stat().st_size > 0  # it ends with the attention maps of its two models


def test_walkthrough_uses_the_public_api_only_and_is_short():
    source = EXAMPLE.read_text()
    tree = ast.parse(source)
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name.startswith("kerasrot.")}, imported
    import kerasrot

    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "kerasrot"}
    assert used <= set(kerasrot.__all__), used - set(kerasrot.__all__)
    prose = set()
    for node in tree.body:  # the Markdown cells
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            prose.update(range(node.lineno, node.end_lineno + 1))
    code = [line for number, line in enumerate(source.splitlines(), 1)
            if number not in prose and line.strip() and not line.strip().startswith("#")]
    assert len(code) < 150
    assert source.startswith('"""\nTitle: ') and "\nDescription: " in source.split('"""')[1]


def test_importing_kerasrot_does_not_import_keras():
    # So that `kerasrot` can refuse a bad KERAS_BACKEND with one line; the public names load on first use.
    check = "import sys, kerasrot; print('keras' in sys.modules, callable(kerasrot.resnet18), 'keras' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True", "True"]
