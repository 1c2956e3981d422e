"""Config: from a recipe file, a preset and `--set` options to the stages' settings.

Experiments are data, as in RotNet's `config/` folder. A recipe
(`recipes/<name>.toml`, shipped inside the package as `kerasrot.recipes`)
lists the training runs ("stages") that make one table or figure, in order,
and the reference numbers it is compared with:

    [[stages]]
    name = "last_block.rotation_init"  # also its key in metrics.json
    task = "classify"                  # or "rotation"
    init = "rotation"                  # weights of that earlier stage, or "random"
    trainable = "last_block"           # "all", "last_block" or "head"
    model = "resnet18"                 # any setting below, for this stage only
    quick = { epochs = 3 }             # ... and for this stage in one preset only

A stage's settings are layered, each layer changing some of the one before:
`recipes/presets.toml`'s `[defaults]`, then its `[defaults.<task>]`, then
the preset's `[<preset>]` and `[<preset>.<task>]`, then the recipe's
`[presets.<preset>.<task>]`, the stage's own settings, and last the user's
`--set <task>.<key>=<value>`. `SETTINGS` lists every key with its type and
meaning; anything else is refused with one line.

A stage's `key` hashes everything that decides its result (its settings,
its data, the key of the stage it starts from), so a stage already trained
by another recipe with the same settings is reused from the cache.
"""

import dataclasses
import hashlib
import importlib.resources
import json
import math
import tomllib

from kerasrot.data import DATASETS, FOLDER, TFDS, DataError, check_dataset_name
from kerasrot.models import ARCHITECTURES, STEMS, TRAINABLE_CHOICES
from kerasrot.pipeline import PIPELINES
from kerasrot.probes import PROBED_BLOCKS, PROBES
from kerasrot.runner.speed import DATA_FORMATS, JIT_COMPILE, ON_OFF, PRECISIONS
from kerasrot.training import OPTIMIZERS, SCHEDULES

TASKS = ("rotation", "classify", "probe")
IMAGE_TASKS = ("rotation", "classify")  # those that train on images (a probe trains on cached features)
PRESETS = ("quick", "paper")
SWEEP = ("figure1", "labels_per_class")  # the list a figure1 stage repeats over (per preset, or --set)
SHARED_FILES = ("presets", "columns")  # the files in recipes/ that are not recipes


class RecipeError(Exception):
    """A recipe, preset or setting is wrong; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Setting:
    kind: type  # int, float, bool, str or list (of ints)
    help: str
    choices: tuple = ()
    minimum: float | None = None  # inclusive
    below: float | None = None  # exclusive upper bound
    optional: bool = False  # may be "all" (None): every image
    tasks: tuple = TASKS  # the tasks it means something for
    check: callable = None  # raises DataError for values that the other fields cannot describe


def _count(help_, minimum=1, optional=False):
    return Setting(int, help_, minimum=minimum, optional=optional)


SETTINGS = {
    # what is trained
    "model": Setting(str, "network", tuple(ARCHITECTURES)),
    "stem": Setting(str, "layers before layer1: 3x3 conv (cifar) or 7x7/2 + max-pool (imagenet)", STEMS),
    "dataset": Setting(str, f"training and test data: {', '.join(DATASETS)}, {FOLDER}PATH (your own images, "
                       f"kerasrot.folders) or {TFDS}NAME (TensorFlow Datasets)", check=check_dataset_name),
    "image_size": _count("input height and width; images are resized to it", minimum=32),
    "images_per_class": _count("training images per class, fixed seed (\"all\": every image)", optional=True),
    "test_images_per_class": _count("test images per class (\"all\": the whole test set)", optional=True),
    "samples_per_epoch": Setting(int, "images per epoch: a small set repeats, a large one is drawn from "
                                 "(\"all\": one pass)", minimum=1, optional=True, tasks=IMAGE_TASKS),
    "init": Setting(str, "\"random\" or the name of an earlier stage whose weights it starts from",
                    tasks=("classify", "probe")),
    "trainable": Setting(str, "blocks that train", tuple(TRAINABLE_CHOICES), tasks=("classify",)),
    "block": Setting(str, "the block whose frozen features are probed", PROBED_BLOCKS, tasks=("probe",)),
    "probe": Setting(str, "classifier on them (kerasrot.probes)", PROBES, tasks=("probe",)),
    # how
    "epochs": _count("training epochs"),
    "batch_size": _count("images per batch (rotation: before the 4 copies)"),
    "optimizer": Setting(str, "optimiser", OPTIMIZERS),
    "learning_rate": Setting(float, "peak learning rate", minimum=1e-12),
    "momentum": Setting(float, "SGD momentum", minimum=0, below=1),
    "nesterov": Setting(bool, "SGD Nesterov momentum"),
    "weight_decay": Setting(float, "decoupled weight decay (Keras' form)", minimum=0),
    "global_clipnorm": Setting(float, "rescale the gradients when their global norm is above this (0: never)",
                               minimum=0),
    "schedule": Setting(str, "learning-rate schedule", SCHEDULES),
    "warmup_epochs": _count("cosine: epochs of linear warm-up", minimum=0),
    "step_epochs": Setting(list, "step: epochs at which the rate is multiplied by step_gamma", minimum=1),
    "step_gamma": Setting(float, "step: factor at each step", minimum=1e-12),
    "label_smoothing": Setting(float, "label smoothing of the cross-entropy", minimum=0, below=1),
    "augment": Setting(bool, "pad-4-crop and horizontal flip", tasks=IMAGE_TASKS),
    "bad_images": Setting(str, "unreadable files in an image folder: stop (error) or leave out, counted (skip)",
                          ("error", "skip"), tasks=IMAGE_TASKS),
    "seed": _count("seeds weights, subsets, order and augmentation", minimum=0),
    # speed: how, not what (results agree within tolerance; see kerasrot.runner.speed)
    "data_format": Setting(str, "layout inside the network", DATA_FORMATS, tasks=IMAGE_TASKS),
    "precision": Setting(str, "compute precision", PRECISIONS, tasks=IMAGE_TASKS),
    "fused_batchnorm": Setting(str, "BatchNorm with PyTorch's fused kernel (torch backend only)", ON_OFF,
                               tasks=IMAGE_TASKS),
    "channels_last_kernels": Setting(str, "conv kernels in PyTorch's channels_last memory, padding inside conv2d "
                                     "and max_pool2d, small maps as matrix products (torch, NCHW); auto: on",
                                     ON_OFF, tasks=IMAGE_TASKS),
    "jit_compile": Setting(str, "compile the train step (XLA / torch.compile); auto: JAX only", JIT_COMPILE),
    "cuda_graphs": Setting(str, "record the train and test steps as CUDA graphs (torch on a GPU); auto: there",
                           ON_OFF, tasks=IMAGE_TASKS),
    "pipeline": Setting(str, "input pipeline: both make the same batches (kerasrot.pipeline)", PIPELINES),
    "streaming": Setting(str, "read image folders from disk batch by batch; auto: folder:PATH larger than "
                         "a quarter of memory", ON_OFF, tasks=IMAGE_TASKS),
    "verbose": Setting(int, "Keras progress: 0 silent, 1 bar, 2 a line per epoch", (0, 1, 2)),
    # watching, not changing what trains
    "knn_monitor": Setting(str, "after each epoch, the kNN accuracy of a block's features (kerasrot.knn); auto: on "
                           "where the data has labels and it costs under 5% of the stage", ON_OFF, tasks=("rotation",)),
    "knn_block": Setting(str, "the block whose pooled features the kNN monitor reads", PROBED_BLOCKS,
                         tasks=("rotation",)),
    "knn_images_per_class": Setting(int, "labelled training images per class the kNN monitor's neighbours come from",
                                    minimum=1, tasks=("rotation",)),
}
# They do not change what a stage computes. (bad_images: a run that stops at a
# bad file leaves no result, so every result on a folder with bad files skipped them.)
NOT_IN_KEY = ("pipeline", "streaming", "bad_images", "verbose", "cuda_graphs", "knn_monitor", "knn_block",
              "knn_images_per_class")


@dataclasses.dataclass
class Stage:
    name: str
    task: str
    settings: dict
    key: str = ""
    init_stage: "Stage | None" = None  # classify: the stage whose weights it starts from


@dataclasses.dataclass
class Recipe:
    name: str
    title: str
    reproduces: str
    preset: str
    stages: list
    reference: dict  # metric -> {"A": float, "B": float}
    notes: str = ""
    columns: dict = dataclasses.field(default_factory=dict)  # reference column -> {"title": ..., "legend": ...}
    report: dict = dataclasses.field(default_factory=dict)  # the recipe's own tables and plots ([report])


def _recipe_files():
    return importlib.resources.files("kerasrot.recipes")


def available():
    """Recipe names: the recipe files shipped in the package."""
    names = (f.name.removesuffix(".toml") for f in _recipe_files().iterdir() if f.name.endswith(".toml"))
    return sorted(n for n in names if n not in SHARED_FILES)


def _read_toml(name):
    try:
        return tomllib.loads(_recipe_files().joinpath(f"{name}.toml").read_text())
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"recipes/{name}.toml is not valid TOML: {error}") from None


# -- values ----------------------------------------------------------------


def parse_value(key, text, where):
    """A `--set` value from text, typed and checked against `SETTINGS[key]`."""
    setting = SETTINGS[key]
    text = text.strip()
    if setting.optional and text.lower() == "all":
        return None
    try:
        if setting.kind is bool:
            if text.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError
            value = text.lower() in ("true", "yes", "1")
        elif setting.kind is list:
            value = [int(v) for v in text.split(",")] if text else []
        else:
            value = setting.kind(text)
    except ValueError:
        kind = "comma-separated integers" if setting.kind is list else setting.kind.__name__
        raise RecipeError(f"{where}: expected {kind} ({setting.help})") from None
    check_value(key, value, where)
    return value


def check_value(key, value, where):
    """Raises RecipeError unless `value` suits `SETTINGS[key]` (recipe files and --set alike)."""
    if key not in SETTINGS:
        raise RecipeError(f"{where}: unknown setting {key!r}; `kerasrot show RECIPE` lists them")
    setting = SETTINGS[key]
    if value is None and setting.optional:
        return
    items = value if setting.kind is list and isinstance(value, list) else [value]
    item_kind = int if setting.kind is list else setting.kind
    for item in items:
        ok = isinstance(item, item_kind) and not (item_kind is not bool and isinstance(item, bool))
        if item_kind is float and isinstance(item, int) and not isinstance(item, bool):
            ok = True
        if not ok or (setting.kind is list and not isinstance(value, list)):
            kind = "a list of integers" if setting.kind is list else item_kind.__name__
            raise RecipeError(f"{where}: {key} must be {kind}, got {value!r}")
        if item_kind is float and not math.isfinite(item):
            raise RecipeError(f"{where}: {key} must be a finite number, got {item!r}")
        if setting.check:
            try:
                setting.check(item)
            except DataError as error:
                raise RecipeError(f"{where}: {error}") from None
        if setting.choices and item not in setting.choices:
            raise RecipeError(f"{where}: {key} must be one of {', '.join(map(str, setting.choices))}, got {item!r}")
        if setting.minimum is not None and item < setting.minimum:
            raise RecipeError(f"{where}: {key} must be at least {setting.minimum:g}, got {item!r}")
        if setting.below is not None and item >= setting.below:
            raise RecipeError(f"{where}: {key} must be below {setting.below:g}, got {item!r}")


def parse_labels_per_class(text, where):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise RecipeError(f"{where}: expected positive integers separated by commas, e.g. 20,100")
    return values


def parse_overrides(pairs):
    """`["classify.epochs=3", ...]` -> `{"classify": {"epochs": 3}, ...}`, every value checked."""
    overrides = {}
    for pair in pairs:
        where = f"--set {pair}"
        if "=" not in pair:
            raise RecipeError(f"{where}: expected TASK.KEY=VALUE, e.g. rotation.epochs=3")
        dotted, text = pair.split("=", 1)
        group, _, key = dotted.strip().partition(".")
        if (group, key) == SWEEP:
            overrides.setdefault(group, {})[key] = parse_labels_per_class(text, where)
            continue
        if group not in TASKS or not key:
            raise RecipeError(
                f"{where}: the key must be TASK.KEY with TASK one of {', '.join(TASKS)} "
                f"(or {'.'.join(SWEEP)} for figure1), e.g. rotation.epochs=3"
            )
        if key not in SETTINGS:
            raise RecipeError(f"{where}: unknown setting {key!r}; `kerasrot show RECIPE` lists them")
        if group not in SETTINGS[key].tasks:
            raise RecipeError(f"{where}: {key} is a setting of {' and '.join(SETTINGS[key].tasks)} stages only")
        overrides.setdefault(group, {})[key] = parse_value(key, text, where)
    return overrides


# -- recipes ---------------------------------------------------------------


def check_sections(presets, spec, name):
    """Refuses sections of presets.toml and of a recipe's [presets] that nothing would read (typos)."""
    for section, table in presets.items():
        if section not in ("defaults", *PRESETS):
            raise RecipeError(f"recipes/presets.toml: unknown section [{section}]")
        for subsection in (k for k, v in table.items() if isinstance(v, dict)):
            if subsection not in TASKS:
                raise RecipeError(f"recipes/presets.toml: unknown section [{section}.{subsection}]")
    for preset, table in spec.get("presets", {}).items():
        if preset not in PRESETS:
            raise RecipeError(f"recipes/{name}.toml: unknown preset in [presets.{preset}]")
        for section in set(table) - {*TASKS, SWEEP[0]}:
            raise RecipeError(f"recipes/{name}.toml: unknown section [presets.{preset}.{section}]")


def task_settings(presets, preset, task):
    """The layered defaults of `presets.toml` for one preset and task."""
    layers = (presets["defaults"], presets["defaults"].get(task, {}),
              presets.get(preset, {}), presets.get(preset, {}).get(task, {}))
    settings = {}
    for layer in layers:
        settings.update({k: v for k, v in layer.items() if not isinstance(v, dict)})
    # [defaults] and [<preset>] hold the settings of every task that has them
    # (a probe, say, has no `augment`); a recipe or --set naming one is refused.
    return {k: v for k, v in settings.items() if k not in SETTINGS or task in SETTINGS[k].tasks}


def load(name, preset="quick", overrides=None):
    """The recipe `name` with `preset`'s settings and the user's overrides, stages keyed."""
    if name not in available():
        raise RecipeError(f"unknown recipe {name!r}; choose one of {', '.join(available())} (kerasrot list)")
    if preset not in PRESETS:
        raise RecipeError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    spec, presets = _read_toml(name), _read_toml("presets")
    check_sections(presets, spec, name)
    changes = spec.get("presets", {}).get(preset, {})
    overrides = overrides or {}
    if SWEEP[0] in overrides and name != SWEEP[0]:
        raise RecipeError(f"--set {'.'.join(SWEEP)}: a setting of the {SWEEP[0]} recipe, not of {name}")
    sweep = overrides.get(SWEEP[0], {}).get(SWEEP[1]) or changes.get(SWEEP[0], {}).get(SWEEP[1], [])

    defaults = {task: task_settings(presets, preset, task) for task in TASKS}
    stages = []
    for entry in spec["stages"]:
        entry = dict(entry)
        stage_name, task = entry.pop("name"), entry.pop("task")
        if task not in TASKS:
            raise RecipeError(f"recipes/{name}.toml: stage {stage_name!r} has unknown task {task!r}")
        repeat = entry.pop("repeat_for", {})
        per_preset = {p: entry.pop(p, {}) for p in PRESETS}
        settings = {
            **defaults[task], **changes.get(task, {}), **entry, **per_preset[preset],
            **overrides.get(task, {}),
        }
        for values in _repeats(repeat, sweep, f"recipes/{name}.toml, stage {stage_name!r}"):
            stages.append(Stage(stage_name.format(**values), task, {**settings, **values}))

    for stage in stages:
        stage.settings = {k: stage.settings[k] for k in sorted(stage.settings, key=_setting_order)}
        where = f"{name} --preset {preset}, stage {stage.name}"
        for key, value in stage.settings.items():
            if value == "all" and SETTINGS.get(key, Setting(str, "")).optional:
                stage.settings[key] = value = None  # TOML has no null: "all" means every image
            check_value(key, value, where)
            if stage.task not in SETTINGS[key].tasks:
                raise RecipeError(f"{where}: {key} is not a setting of {stage.task} stages")
        missing = [k for k, s in SETTINGS.items() if stage.task in s.tasks and k not in stage.settings]
        if missing:
            raise RecipeError(f"{where}: no value for {', '.join(missing)} (recipes/presets.toml)")
    key_stages(stages, where=f"recipes/{name}.toml")
    reference = spec.get("reference", {})
    return Recipe(
        name=name, title=spec["title"], reproduces=spec["reproduces"], preset=preset, stages=stages,
        reference=reference, notes=spec.get("notes", ""), columns=_columns(reference, name),
        report=spec.get("report", {}),
    )


def _columns(reference, name):
    """The titles and legends (recipes/columns.toml) of the columns a recipe's references cite."""
    known = _read_toml("columns")
    cited = sorted({column for numbers in reference.values() for column in numbers})
    unknown = [column for column in cited if column not in known]
    if unknown:
        raise RecipeError(f"recipes/{name}.toml: reference column {unknown[0]!r} is not in recipes/columns.toml")
    return {column: known[column] for column in cited}


def _repeats(repeat, sweep, where):
    """`repeat_for = {setting = [values], ...}` -> one dict of values per stage (every combination).

    A list may be the name `"labels_per_class"`: the recipe's sweep, set per
    preset (`[presets.<preset>.figure1]`) or by `--set figure1.labels_per_class`.
    """
    combinations = [{}]
    for key, values in repeat.items():
        if values == SWEEP[1]:
            values = sweep
        if key not in SETTINGS or not isinstance(values, list) or not values:
            raise RecipeError(f"{where}: repeat_for needs settings with lists of values, got {key} = {values!r}")
        combinations = [{**done, key: value} for done in combinations for value in values]
    return combinations


def _setting_order(key):
    return list(SETTINGS).index(key) if key in SETTINGS else len(SETTINGS)


def key_stages(stages, context=None, where="recipe"):
    """Gives each stage a key: a hash of what decides its result.

    That is its settings, its task, the key of the stage it starts from,
    and `context` (the runner adds the data source and the backend).
    """
    keys, by_name = {}, {}
    for stage in stages:
        identity = {k: v for k, v in stage.settings.items() if k not in NOT_IN_KEY}
        identity.update(context or {}, task=stage.task)
        if stage.settings.get("init", "random") != "random":
            init = stage.settings["init"]
            if init not in keys:
                raise RecipeError(f"{where}: stage {stage.name!r} starts from {init!r}, no earlier stage")
            identity["init"] = keys[init]
            stage.init_stage = by_name[init]
        stage.key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        keys[stage.name], by_name[stage.name] = stage.key, stage
