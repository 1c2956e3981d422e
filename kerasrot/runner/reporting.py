"""Reporting: metrics.json, table.md, history.csv and plots for a recipe run.

`metrics.json` holds every number and how it was made (`provenance`);
everything else in `results/<recipe>/<preset>/` is rendered from it, so
`kerasrot report RECIPE` can redraw tables and plots without training.
"""

import csv
import hashlib
import io
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from kerasrot import __version__
from kerasrot.data import FOLDER, TFDS
from kerasrot.runner import files

PACKAGES = ("kerasrot", "keras", "torch", "jax", "tensorflow", "tensorflow-cpu", "tensorflow-datasets", "numpy")
HISTORY_FIELDS = ("stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds")


def results_dir(root, recipe, preset, backend_name):
    """`ROOT/<recipe>/<preset>/`, with `-<backend>` added for backends other than torch."""
    suffix = "" if backend_name == "torch" else f"-{backend_name}"
    return Path(root) / recipe / f"{preset}{suffix}"


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


def provenance(command, backend_name, device, data_source, wall_seconds, settings, commit, devices="1 device"):
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


def citations(recipe):
    """What a recipe says about its table: title, what it reproduces, notes and the published numbers."""
    return {"title": recipe.title, "reproduces": recipe.reproduces, "notes": recipe.notes,
            "reference": recipe.reference}


def build_metrics(recipe, results, prov):
    return {
        "recipe": recipe.name,
        "preset": recipe.preset,
        **citations(recipe),
        "accuracy": {name: r["accuracy"] for name, r in results.items()},
        "stages": {
            name: {k: v for k, v in r.items() if k != "name"} for name, r in results.items()
        },
        "provenance": prov,
    }


def markdown_table(metrics):
    """Our accuracy beside the references (reports A and B, or the paper's figure)."""
    networks = [name for name, stage in metrics["stages"].items() if stage["task"] != "probe"]
    columns = sorted({col for name in networks for col in metrics["reference"].get(name, {})})
    # Where rows differ in what the network sees (ImageNette at 64x64, or another stem), say each row's.
    inputs = {name: _trained_at(metrics["stages"][name]) for name in networks}
    show_inputs = len(set(inputs.values())) > 1
    header = ["quantity", "ours", *[_column_title(c) for c in columns], "train images", "epochs",
              *(["trained at"] if show_inputs else [])]
    lines = [
        f"# {metrics['recipe']} ({metrics['preset']}): {metrics['title']}",
        "",
        metrics["reproduces"],
        "",
        *probe_table(metrics),
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name in networks:
        ours, stage = metrics["accuracy"][name], metrics["stages"][name]
        ref = metrics["reference"].get(name, {})
        cells = [name, f"{ours:.2f}", *[_fmt(ref.get(c)) for c in columns]]
        cells += [str(stage.get("train_images", "")), _epochs(stage), *([inputs[name]] if show_inputs else [])]
        lines.append("| " + " | ".join(cells) + " |")
    p = metrics["provenance"]
    lines += [
        "",
        "Test accuracy in percent"
        + (" (rotation rows: over the four rotations of every test image)." if any(
            s["task"] == "rotation" for s in metrics["stages"].values()) else "."),
        f"Test samples per row: {', '.join(sorted({str(s['test_samples']) for s in metrics['stages'].values()}))}.",
    ]
    notes = " ".join([*(COLUMN_LEGENDS[c] for c in columns if c in COLUMN_LEGENDS), metrics.get("notes", "")]).strip()
    if notes:
        lines += ["", notes]
    own_data = _own_data(metrics)
    if own_data:
        lines += ["", own_data]
    lines += [
        "",
        f"Made by `{p['command']}` on {p['device']}{_data_parallel(p)}, backend {p['backend']} "
        f"(precision {', '.join(p['precision'])}, data format {', '.join(p['data_format'])}"
        f"{', fused BatchNorm' if 'on' in p.get('fused_batchnorm', []) else ''}"
        f"{', channels_last kernels' if 'on' in p.get('channels_last_kernels', []) else ''}), "
        f"data: {p['data']}, commit {p['commit']}, {_minutes(metrics)}.",
        *_made_elsewhere(metrics),
    ]
    if "cifar10 (JPEG" in p["data"]:
        lines.append(
            "CIFAR-10 was read from JPEG files, a lossy copy of its original pixels: "
            "accuracies can differ slightly from the original dataset's."
        )
    return "\n".join(lines) + "\n"


def _own_data(metrics):
    """"Own data: rotation on folder:/photos." where a stage trained on a folder or tfds name; else ""."""
    own = {}
    for name, stage in metrics["stages"].items():
        dataset = stage.get("settings", {}).get("dataset", "")
        if dataset.startswith((FOLDER, TFDS)):
            own.setdefault(dataset, []).append(name)
    if not own:
        return ""
    parts = [f"{', '.join(names)} on `{dataset}`" for dataset, names in own.items()]
    return f"Own data, in place of the recipe's: {'; '.join(parts)} (the title above names the recipe's data)."


def _made_elsewhere(metrics):
    """["Reused, made by another run: rotation (GPU ..., commit ...)."] where a cached stage's machine or code differ."""
    p, made_by = metrics["provenance"], {}
    for name, stage in metrics["stages"].items():
        made = (stage.get("device", p["device"]), stage.get("commit", p["commit"]))  # older results name neither
        if stage.get("cached") and made != (p["device"], p["commit"]):
            made_by.setdefault(made, []).append(name)
    if not made_by:
        return []
    parts = [f"{', '.join(names)} ({machine}, commit {commit})" for (machine, commit), names in made_by.items()]
    return [f"Reused, made by another run: {'; '.join(parts)}."]


def _minutes(metrics):
    """"3.5 min", and where the run reused stages, what making them took: a result merged from several runs."""
    minutes = f"{metrics['provenance']['wall_seconds'] / 60:.1f} min"
    reused = [stage for stage in metrics["stages"].values() if stage.get("cached")]
    if not reused:
        return minutes
    earlier = sum(stage["wall_seconds_this_run"] for stage in reused) / 60  # stages.run_stage always records it
    return (f"{minutes}, plus {earlier:.1f} min in the earlier runs that made the "
            f"{len(reused)} stage{'s' if len(reused) > 1 else ''} it reused")


def _data_parallel(provenance):
    """"; data-parallel over 2 devices (...)" where the device line does not say so already; else nothing."""
    devices = provenance.get("devices", "1 device")  # older metrics.json have no such field
    if devices == "1 device" or "data-parallel" in provenance["device"]:
        return ""
    return f"; data-parallel over {devices}"


def _epochs(stage):
    """The epochs cell: "8", or "8 x 10000 images" where an epoch is not one pass over the train images."""
    epochs, per_epoch = stage["settings"]["epochs"], stage["settings"].get("samples_per_epoch")
    return f"{epochs} x {per_epoch} images" if per_epoch and per_epoch != stage.get("train_images") else str(epochs)


STEM_NAMES = {"cifar": "CIFAR", "imagenet": "ImageNet"}  # models.STEMS, as the tables' prose writes them


def _trained_at(stage):
    """The input a stage trained on: "64x64, CIFAR stem"."""
    size, stem = stage["settings"]["image_size"], stage["settings"]["stem"]
    return f"{size}x{size}, {STEM_NAMES[stem]} stem"  # config checks stem is one of models.STEMS


def _column_title(column):
    titles = {"A": "report A", "B": "report B", "paper": "paper (Fig. 5b, NIN)", "nin": "paper (Table 1, NIN)",
              "rotnet": "paper (NIN)"}
    return titles.get(column, column)


# What a reference column means, said once below every table that has it (recipes' notes say where each number is from).
COLUMN_LEGENDS = {
    "rotnet": "paper (NIN): the RotNet paper's own numbers (Gidaris et al. 2018, its 4-block Network-in-Network, "
              "as quoted by secondary sources), the upper anchors we aim past.",
}


def probes_by_block(metrics):
    """`{block: {(probe, init): accuracy}}` of the probe stages, blocks in the order they were probed."""
    table = {}
    for name, stage in metrics["stages"].items():
        if stage["task"] == "probe":
            init = name.rsplit(".", 1)[1]  # probes.<block>.<probe>.<init>
            table.setdefault(stage["settings"]["block"], {})[stage["settings"]["probe"], init] = stage["accuracy"]
    return table


def probe_table(metrics):
    """Blocks as rows, one column per probe and init, the paper's per-block numbers beside: lines of Markdown."""
    table = probes_by_block(metrics)
    if not table:
        return []
    inits = list(dict.fromkeys(init for row in table.values() for _, init in row))
    columns = sorted({key for row in table.values() for key in row}, key=lambda c: (c[0], inits.index(c[1])))
    header = ["block", *[f"{probe}, {init.replace('_', ' ')}" for probe, init in columns], _column_title("nin")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for block, row in table.items():
        paper = metrics["reference"].get(f"probes.{block}.nonlinear.rotation_init", {}).get("nin")
        lines.append("| " + " | ".join([block, *[_fmt(row.get(c)) for c in columns], _fmt(paper)]) + " |")
    return ["Probes: test accuracy of a classifier on each block's frozen features.", "", *lines, "",
            "The networks they probe:", ""]


def _fmt(value):
    return "-" if value is None else f"{value:.2f}"


def history_csv(metrics):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for name, stage in metrics["stages"].items():
        for record in stage["history"]:
            writer.writerow({"stage": name, **record})
    return out.getvalue()


def plot_curves(metrics, path):
    """Test accuracy per epoch of every stage: rotation stages left, classification right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("rotation", "classify") if any(s["task"] == t for s in metrics["stages"].values())]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, stage in metrics["stages"].items():
            if stage["task"] != task or not stage["history"]:
                continue
            epochs = [r["epoch"] for r in stage["history"]]
            ax.plot(epochs, [100 * r.get("val_accuracy", 0) for r in stage["history"]], marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # no epoch 2.5
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("rotation prediction" if task == "rotation" else "CIFAR-10 classification")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{metrics['recipe']} ({metrics['preset']})")
    fig.tight_layout()
    _save_figure(fig, path)


def plot_figure1(metrics, path):
    """Accuracy vs labelled images per class (log x axis), both inits and the paper's trend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for init, style in (("rotation_init", "o-"), ("random_init", "s-")):
        points = sorted(
            (int(name.split(".")[1]), acc)
            for name, acc in metrics["accuracy"].items()
            if name.startswith("figure1.") and name.endswith(init)
        )
        if points:
            ax.plot(*zip(*points), style, label=f"ours, {init.replace('_', ' ')}")
        ref = sorted(
            (int(name.split(".")[1]), r["paper"])
            for name, r in metrics["reference"].items()
            if name.endswith(init) and "paper" in r
        )
        if ref:
            ax.plot(*zip(*ref), style, alpha=0.35, label=f"paper trend (NIN), {init.replace('_', ' ')}")
    ax.set_xscale("log")
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.set_title(f"figure1 ({metrics['preset']}): rotation weights vs random weights")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_probes(metrics, path):
    """Probe accuracy against depth: one line per init and classifier, the paper's NIN beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = probes_by_block(metrics)
    blocks = list(table)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    styles = {"rotation_init": "C0", "random_init": "C1", "supervised": "C2"}
    for probe, init in dict.fromkeys(key for row in table.values() for key in row):
        points = [(i, table[b][probe, init]) for i, b in enumerate(blocks) if (probe, init) in table[b]]
        ax.plot(*zip(*points), "o-" if probe == "nonlinear" else "s--", color=styles.get(init),
                label=f"{probe}, {init.replace('_', ' ')}")
    paper = [(i, metrics["reference"][f"probes.{b}.nonlinear.rotation_init"]["nin"]) for i, b in enumerate(blocks)
             if f"probes.{b}.nonlinear.rotation_init" in metrics["reference"]]
    if paper:
        ax.plot(*zip(*paper), "o:", color="gray", alpha=0.6, label="paper: NIN blocks 1-4, non-linear, rotation")
    ax.set_xticks(range(len(blocks)), blocks)
    ax.set_xlabel("block whose frozen features are probed")
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.set_title(f"probes ({metrics['preset']}): where the useful features are")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the lines, not over them
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path):
    import matplotlib.pyplot as plt

    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(metrics, directory):
    """Writes metrics.json, table.md, history.csv and the plots into `directory`."""
    directory = Path(directory)
    files.write_json(directory / "metrics.json", metrics)
    render(directory)


def render(directory, recipe=None):
    """(Re)draws table.md, history.csv and the PNGs from `directory/metrics.json`.

    With `recipe` (`kerasrot report`), the recipe's citations as they read now
    stand in for those the run recorded: a published number added to a recipe
    after a run shows beside it. metrics.json itself, the run's record, is
    never rewritten.
    """
    directory = Path(directory)
    metrics = files.read_json(directory / "metrics.json")
    if recipe is not None:
        metrics.update(citations(recipe))
    files.write_text(directory / "table.md", markdown_table(metrics))
    files.write_text(directory / "history.csv", history_csv(metrics))
    plot_curves(metrics, directory / "curves.png")
    if metrics["recipe"] == "figure1":
        plot_figure1(metrics, directory / "figure1.png")
    if probes_by_block(metrics):
        plot_probes(metrics, directory / "probes.png")
    return metrics

