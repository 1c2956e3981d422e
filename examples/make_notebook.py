"""Make examples/rotnet_table2.ipynb from examples/rotnet_table2.py.

The walkthrough is written once, as a keras.io-style script: a header
docstring (Title, Author, Date created, Last modified, Description,
Accelerator), then prose in top-level triple-quoted blocks between runs of
code. The script is the source of truth: it runs as it is, its diffs read
like code, and its tests import nothing from a notebook. The notebook beside
it is generated from it, the way keras-io's scripts/tutobooks.py does it:

- the header becomes a Markdown cell: "# <Title>" and a list of the other
  fields, followed by one Markdown sentence on installing kerasrot in Colab;
- each prose block becomes a Markdown cell, its text as it is;
- each run of code between them becomes a code cell, without the blank
  lines at its ends, with no outputs and no execution count.

The output is deterministic (cell ids from the cell index, sorted keys), so
regenerating an unchanged script gives the same bytes and the committed
notebook can be checked against the script:

    python examples/make_notebook.py           # write the .ipynb beside the .py
    python examples/make_notebook.py --check   # exit 1 if the .ipynb is stale

Standard library only; no nbformat or jupytext needed.
"""

import argparse
import ast
import json
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().with_name("rotnet_table2.py")

INSTALL_NOTE = (
    "To run this notebook in Colab, first install kerasrot from a clone of its repository "
    '(`pip install ".[torch]"` in the clone, as its README says).'
)

# What Jupyter itself writes for a Python 3 kernel, less the interpreter version
# (which would make the output depend on the machine that generated it).
NOTEBOOK_METADATA = {
    "colab": {"provenance": [], "toc_visible": True},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {
        "codemirror_mode": {"name": "ipython", "version": 3},
        "file_extension": ".py",
        "mimetype": "text/x-python",
        "name": "python",
        "nbconvert_exporter": "python",
        "pygments_lexer": "ipython3",
    },
}


def _strip_blank_lines(lines):
    """The lines without the blank ones at either end."""
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end]


def _string_text(segment):
    """The text of a string literal's source, quotes removed, escapes left as they are."""
    body = segment.lstrip("rRuU")
    for quote in ('"""', "'''", '"', "'"):
        if body.startswith(quote) and body.endswith(quote) and len(body) >= 2 * len(quote):
            return body[len(quote):-len(quote)]
    raise ValueError(f"not a plain string literal: {segment[:40]!r}")


def _split(text):
    """The script as a list of ("markdown" | "code", lines), in order.

    A prose block is a top-level statement that is only a string; everything
    between two of them is one run of code.
    """
    tree = ast.parse(text)
    lines = text.splitlines()
    pieces, code_start = [], 0  # code_start: 0-based index of the first line not yet used
    for node in tree.body:
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            continue
        first, last = node.lineno - 1, node.end_lineno - 1
        if node.col_offset != 0 or lines[last][node.end_col_offset:].strip():
            raise ValueError(f"line {node.lineno}: a prose block must stand on lines of its own")
        pieces.append(("code", lines[code_start:first]))
        segment = ast.get_source_segment(text, node)
        pieces.append(("markdown", _string_text(segment).splitlines()))
        code_start = last + 1
    pieces.append(("code", lines[code_start:]))
    pieces = [(kind, _strip_blank_lines(block)) for kind, block in pieces]
    return [(kind, block) for kind, block in pieces if block]


def _parse_header(lines):
    """The header's "Field: value" lines as an ordered list of (field, value)."""
    fields = []
    for line in lines:
        name, sep, value = line.partition(":")
        if sep and name.strip() and not name.startswith(" "):
            fields.append((name.strip(), value.strip()))
        elif fields and line.strip():  # a value continued on the next line
            fields[-1] = (fields[-1][0], f"{fields[-1][1]} {line.strip()}")
        elif line.strip():
            raise ValueError(f"header line is not 'Field: value': {line!r}")
    if not fields or fields[0][0] != "Title" or not fields[0][1]:
        raise ValueError("the script must start with a docstring header whose first line is 'Title: ...'")
    return fields


def _source(lines):
    """Jupyter's form of a cell's text: its lines, each but the last ending in a newline."""
    return [line + "\n" for line in lines[:-1]] + lines[-1:]


def notebook_from_script(text):
    """The nbformat-4 notebook (a dict) made from a keras.io-style script's text."""
    pieces = _split(text)
    if not pieces or pieces[0][0] != "markdown":
        raise ValueError("the script must start with a docstring header")
    fields = _parse_header(pieces[0][1])
    header = [f"# {fields[0][1]}", ""] + [f"- **{name}:** {value}" for name, value in fields[1:]]
    cells = []
    for kind, lines in [("markdown", header), ("markdown", [INSTALL_NOTE])] + pieces[1:]:
        cell = {"cell_type": kind, "id": f"cell-{len(cells)}", "metadata": {}, "source": _source(lines)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {"cells": cells, "metadata": NOTEBOOK_METADATA, "nbformat": 4, "nbformat_minor": 5}


def render(notebook):
    """The notebook as the text of an .ipynb file, the same bytes for the same notebook."""
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("script", nargs="?", type=Path, default=EXAMPLE,
                        help="the keras.io-style script (default: examples/rotnet_table2.py)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the .ipynb differs from what the script makes")
    args = parser.parse_args(argv)
    made = render(notebook_from_script(args.script.read_text(encoding="utf-8")))
    target = args.script.with_suffix(".ipynb")
    if args.check:
        current = target.read_bytes().decode("utf-8") if target.exists() else None
        if current != made:
            print(f"{target.name} is {'missing' if current is None else 'out of date'} "
                  f"with {args.script.name}: run `python examples/make_notebook.py`", file=sys.stderr)
            return 1
        return 0
    target.write_text(made, encoding="utf-8", newline="\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
