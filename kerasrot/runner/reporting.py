"""Reporting: metrics.json, table.md, history.csv and plots for a recipe run.

`metrics.json` holds every number and how it was made (`provenance`);
everything else in `results/<recipe>/<preset>/` is rendered from it, so
`kerasrot report RECIPE` can redraw tables and plots without training.
"""

import csv
import io
import re
from pathlib import Path

from kerasrot import data, visualize
from kerasrot.runner import files

HISTORY_FIELDS = ("stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds")


def results_dir(root, recipe, preset, backend_name):
    """`ROOT/<recipe>/<preset>/`, with `-<backend>` added for backends other than torch."""
    suffix = "" if backend_name == "torch" else f"-{backend_name}"
    return Path(root) / recipe / f"{preset}{suffix}"


def citations(recipe):
    """What a recipe says about its table: title, what it reproduces, notes, the published numbers,
    their columns' titles and legends, and the recipe's own plots."""
    return {"title": recipe.title, "reproduces": recipe.reproduces, "notes": recipe.notes,
            "reference": recipe.reference, "columns": recipe.columns, "report": recipe.report}


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
    header = ["quantity", "ours", *[_column_title(metrics, c) for c in columns], "train images", "epochs",
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
    legends = [metrics.get("columns", {}).get(c, {}).get("legend") for c in columns]
    notes = " ".join([*filter(None, legends), metrics.get("notes", "")]).strip()
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
        *data.caveats(p["data"]),
    ]
    return "\n".join(lines) + "\n"


def _own_data(metrics):
    """"Own data: rotation on folder:/photos." where a stage trained on a folder or tfds name; else ""."""
    own = {}
    for name, stage in metrics["stages"].items():
        dataset = stage.get("settings", {}).get("dataset", "")
        if dataset.startswith((data.FOLDER, data.TFDS)):
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


def _column_title(metrics, column):
    return metrics.get("columns", {}).get(column, {}).get("title", column)


def named_by(pattern, name):
    """The fields of a stage name written by `pattern`: ("probes.{block}.{init}", "probes.stem.random") ->
    {"block": "stem", "init": "random"}; None where the name does not fit."""
    regex = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^.]+)", re.escape(pattern))
    found = re.fullmatch(regex, name)
    return found.groupdict() if found else None


def probes_by_block(metrics):
    """`{block: {(probe, init): accuracy}}` of the probe stages, blocks in the order they were probed."""
    spec, table = metrics.get("report", {}).get("probes"), {}
    for name, stage in (metrics["stages"].items() if spec else ()):
        fields = named_by(spec["stages"], name)
        if stage["task"] == "probe" and fields:
            table.setdefault(fields["block"], {})[fields["probe"], fields["init"]] = stage["accuracy"]
    return table


def probe_reference(metrics, block):
    """The published number the probes' spec sets beside `block`, or None."""
    spec = metrics["report"]["probes"]
    return metrics["reference"].get(spec["reference_stage"].format(block=block), {}).get(spec["column"])


def probe_table(metrics):
    """Blocks as rows, one column per probe and init, the paper's per-block numbers beside: lines of Markdown."""
    table = probes_by_block(metrics)
    if not table:
        return []
    inits = list(dict.fromkeys(init for row in table.values() for _, init in row))
    columns = sorted({key for row in table.values() for key in row}, key=lambda c: (c[0], inits.index(c[1])))
    header = ["block", *[f"{probe}, {init.replace('_', ' ')}" for probe, init in columns],
              _column_title(metrics, metrics["report"]["probes"]["column"])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for block, row in table.items():
        cells = [block, *[_fmt(row.get(c)) for c in columns], _fmt(probe_reference(metrics, block))]
        lines.append("| " + " | ".join(cells) + " |")
    return ["Probes: test accuracy of a classifier on each block's frozen features.", "", *lines, "",
            "The networks they probe:", ""]


def _fmt(value):
    return "-" if value is None else f"{value:.2f}"


def history_csv(metrics):
    records = [record for stage in metrics["stages"].values() for record in stage["history"]]
    knn = ("knn_accuracy", "knn_seconds") if any("knn_accuracy" in record for record in records) else ()  # kerasrot.knn
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=(*HISTORY_FIELDS, *knn), extrasaction="ignore")
    writer.writeheader()
    for name, stage in metrics["stages"].items():
        for record in stage["history"]:
            writer.writerow({"stage": name, **record})
    return out.getvalue()


def pyplot():
    """matplotlib's pyplot, drawing to files: the command writes PNGs and needs no screen."""
    import matplotlib

    matplotlib.use("Agg")
    return visualize.pyplot()


def dataset_title(metrics, task):
    """How the plots name the data a task's stages trained on: "CIFAR-10", or the dataset's name."""
    names = dict.fromkeys(stage["settings"]["dataset"] for stage in metrics["stages"].values() if stage["task"] == task)
    return ", ".join(data.DATASETS[n].title if n in data.DATASETS else n for n in names)


def plot_curves(metrics, path):
    """Test accuracy per epoch of every stage: rotation stages left, classification right.

    Where a rotation stage recorded a kNN monitor's accuracy (`kerasrot.knn`),
    it is drawn beside the rotation accuracy, dashed, in the same colour.
    """
    import matplotlib

    plt = pyplot()
    tasks = [t for t in ("rotation", "classify") if any(s["task"] == t for s in metrics["stages"].values())]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, stage in metrics["stages"].items():
            if stage["task"] != task or not stage["history"]:
                continue
            epochs = [r["epoch"] for r in stage["history"]]
            line, = ax.plot(epochs, [100 * r.get("val_accuracy", 0) for r in stage["history"]], marker="o",
                            label=name)
            if all("knn_accuracy" in r for r in stage["history"]):
                ax.plot(epochs, [100 * r["knn_accuracy"] for r in stage["history"]], "s--", color=line.get_color(),
                        label=f"{name}: kNN on {stage['settings'].get('knn_block', 'its')} features, "
                              f"{dataset_title(metrics, task)} labels")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # no epoch 2.5
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("rotation prediction" if task == "rotation" else f"{dataset_title(metrics, task)} classification")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{metrics['recipe']} ({metrics['preset']})")
    fig.tight_layout()
    save_figure(fig, path)


def plot_sweep(metrics, path):
    """Accuracy against a swept setting (log x axis), one line per init, the published trend beside.

    The recipe's `[report.sweep]` says how its stages are named
    ("figure1.{x}.{line}") and which reference column is the trend.
    """
    spec = metrics["report"]["sweep"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    swept = [fields for name in metrics["stages"] if (fields := named_by(spec["stages"], name))]  # not rotation
    lines = list(dict.fromkeys(fields["line"] for fields in swept))
    for line, style in zip(lines, ("o-", "s-", "^-", "v-")):
        ours = sorted((int(fields["x"]), accuracy) for name, accuracy in metrics["accuracy"].items()
                      if (fields := named_by(spec["stages"], name)) and fields["line"] == line)
        if ours:
            ax.plot(*zip(*ours), style, label=f"ours, {line.replace('_', ' ')}")
        trend = sorted((int(fields["x"]), numbers[spec["column"]]) for name, numbers in metrics["reference"].items()
                       if (fields := named_by(spec["stages"], name)) and fields["line"] == line
                       and spec["column"] in numbers)
        if trend:
            ax.plot(*zip(*trend), style, alpha=0.35, label=f"{spec['reference_label']}, {line.replace('_', ' ')}")
    ax.set_xscale("log")
    ax.set_xlabel(spec["xlabel"])
    ax.set_ylabel(f"{dataset_title(metrics, 'classify')} test accuracy (%)")
    ax.set_title(f"{metrics['recipe']} ({metrics['preset']}): {spec['title']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_probes(metrics, path):
    """Probe accuracy against depth: one line per init and classifier, the paper's beside."""
    spec = metrics["report"]["probes"]
    plt = pyplot()
    table = probes_by_block(metrics)
    blocks = list(table)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    inits = list(dict.fromkeys(init for row in table.values() for _, init in row))
    for probe, init in dict.fromkeys(key for row in table.values() for key in row):
        points = [(i, table[b][probe, init]) for i, b in enumerate(blocks) if (probe, init) in table[b]]
        ax.plot(*zip(*points), "o-" if probe == "nonlinear" else "s--", color=f"C{inits.index(init)}",
                label=f"{probe}, {init.replace('_', ' ')}")
    paper = [(i, value) for i, b in enumerate(blocks) if (value := probe_reference(metrics, b)) is not None]
    if paper:
        ax.plot(*zip(*paper), "o:", color="gray", alpha=0.6, label=spec["reference_label"])
    ax.set_xticks(range(len(blocks)), blocks)
    ax.set_xlabel("block whose frozen features are probed")
    ax.set_ylabel(f"{dataset_title(metrics, 'probe')} test accuracy (%)")
    ax.set_title(f"{metrics['recipe']} ({metrics['preset']}): where the useful features are")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the lines, not over them
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path):
    """Writes a matplotlib figure to `path` as PNG, atomically, and closes it."""
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)


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
    report = metrics.get("report", {})
    if "sweep" in report:
        plot_sweep(metrics, directory / report["sweep"]["file"])
    if probes_by_block(metrics):
        plot_probes(metrics, directory / "probes.png")
    return metrics
