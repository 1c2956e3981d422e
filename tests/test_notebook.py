"""The committed notebook is what examples/make_notebook.py makes from the walkthrough script."""

import ast
import importlib.util
import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPT = EXAMPLES / "rotnet_table2.py"
NOTEBOOK = EXAMPLES / "rotnet_table2.ipynb"


def _load_make_notebook():
    spec = importlib.util.spec_from_file_location("make_notebook", EXAMPLES / "make_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_notebook = _load_make_notebook()


def _code(cell):
    return "".join(cell["source"])


def _without_strings(module):
    """ast.dump of a module without its top-level string statements (the prose)."""
    module.body = [node for node in module.body
                   if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                           and isinstance(node.value.value, str))]
    return ast.dump(module)


def test_committed_notebook_is_up_to_date():
    made = make_notebook.render(make_notebook.notebook_from_script(SCRIPT.read_text(encoding="utf-8")))
    assert NOTEBOOK.exists(), f"{NOTEBOOK.name} is missing: run `python examples/make_notebook.py`"
    assert NOTEBOOK.read_bytes().decode("utf-8") == made, (
        f"{NOTEBOOK.name} is out of date with {SCRIPT.name}: run `python examples/make_notebook.py`")
    assert make_notebook.main(["--check"]) == 0


def test_check_fails_in_one_line_on_a_stale_or_missing_notebook(tmp_path, capsys):
    script = tmp_path / "example.py"
    script.write_text('"""\nTitle: T\n"""\n\nx = 1\n', encoding="utf-8")
    assert make_notebook.main([str(script), "--check"]) == 1
    assert make_notebook.main([str(script)]) == 0 and make_notebook.main([str(script), "--check"]) == 0
    script.write_text('"""\nTitle: T\n"""\n\nx = 2\n', encoding="utf-8")
    capsys.readouterr()
    assert make_notebook.main([str(script), "--check"]) == 1
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "python examples/make_notebook.py" in message


def test_notebook_has_the_nbformat4_shape_and_the_title_first():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert (notebook["nbformat"], notebook["nbformat_minor"]) == (4, 5)
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    assert notebook["metadata"]["language_info"]["name"] == "python"
    ids = [cell["id"] for cell in notebook["cells"]]
    assert len(set(ids)) == len(ids)
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], list) and all(isinstance(line, str) for line in cell["source"])
        assert all(line.endswith("\n") for line in cell["source"][:-1]), cell["id"]
        assert cell["source"] and cell["source"][0].strip() and cell["source"][-1].strip(), cell["id"]
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
        else:
            assert "outputs" not in cell and "execution_count" not in cell
    title = ast.get_docstring(ast.parse(SCRIPT.read_text(encoding="utf-8"))).splitlines()[0]
    assert title.startswith("Title: ")
    first = notebook["cells"][0]
    assert first["cell_type"] == "markdown"
    assert first["source"][0] == f"# {title[len('Title: '):]}\n"
    assert notebook["cells"][1]["cell_type"] == "markdown" and "pip install" in _code(notebook["cells"][1])


def test_code_cells_compile_and_are_the_script_without_its_prose():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code_cells = [_code(cell) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert len(code_cells) >= 5
    for i, source in enumerate(code_cells):
        compile(source, f"<code cell {i}>", "exec")
        assert "parse_args()" not in source, "Jupyter passes its own arguments: use parse_known_args()"
    joined = ast.parse("\n\n".join(code_cells))
    assert _without_strings(joined) == _without_strings(ast.parse(SCRIPT.read_text(encoding="utf-8")))
    prose = [_code(cell) for cell in notebook["cells"][2:] if cell["cell_type"] == "markdown"]
    assert all(text.startswith("## ") for text in prose), [text[:30] for text in prose]


def test_a_small_script_round_trips_to_the_expected_cells():
    script = '''"""
Title: A tiny example
Author: someone
Date created: 2026/01/01
Last modified: 2026/01/02
Description: Two prose blocks
  and some code.
Accelerator: None
"""

"""
## Setup

Backslashes stay: a \\\\ b.
"""


import os

x = 1  # a comment


"""
## Use
"""
def f():
    """A docstring is code."""
    return x


print(f())
'''
    notebook = make_notebook.notebook_from_script(script)
    cells = [(cell["cell_type"], cell["id"], "".join(cell["source"])) for cell in notebook["cells"]]
    assert cells == [
        ("markdown", "cell-0", "# A tiny example\n\n- **Author:** someone\n- **Date created:** 2026/01/01\n"
                               "- **Last modified:** 2026/01/02\n- **Description:** Two prose blocks and some code.\n"
                               "- **Accelerator:** None"),
        ("markdown", "cell-1", make_notebook.INSTALL_NOTE),
        ("markdown", "cell-2", "## Setup\n\nBackslashes stay: a \\\\ b."),
        ("code", "cell-3", "import os\n\nx = 1  # a comment"),
        ("markdown", "cell-4", "## Use"),
        ("code", "cell-5", 'def f():\n    """A docstring is code."""\n    return x\n\n\nprint(f())'),
    ]
    assert [cell["source"] for cell in notebook["cells"]][3] == ["import os\n", "\n", "x = 1  # a comment"]
    text = make_notebook.render(notebook)
    assert text == make_notebook.render(make_notebook.notebook_from_script(script)) and text.endswith("}\n")
    assert json.loads(text) == notebook
