"""Recipes: experiments as data.

A recipe (`recipes/<name>.toml`) says what a table or figure is made of:
its stages, in order, and the reference numbers it is compared with. Each
stage is one training run:

    [[stages]]
    name = "last_block.rotation_init"  # also its key in metrics.json
    task = "classify"                  # or "rotation"
    init = "rotation"                  # weights of that earlier stage, or "random"
    trainable = "last_block"           # "all", "last_block" or "head"
    model = "resnet18"                 # any setting below, for this stage only
    quick = { epochs = 3 }             # ... and for this stage in one preset only

Hyperparameters come from `recipes/presets.toml`, one table per preset
(`quick`, `paper`) and task (`rotation`, `classify`); a recipe may change
some under `[presets.<preset>.<task>]`, and the user with
`--set <task>.<key>=<value>` (the last word). `SETTINGS` below lists every
key with its type and meaning; anything else is rejected.

A stage's `key` hashes everything that decides its result (its settings,
its data, the key of the stage it starts from), so a stage already trained
by another recipe with the same settings is reused from the cache.
"""

import dataclasses
import hashlib
import json
import tomllib
from pathlib import Path

from kerasrot.backend import DATA_FORMATS, FUSED_BATCHNORM, JIT_COMPILE, PRECISIONS
from kerasrot.data import DATASETS
from kerasrot.models import ARCHITECTURES, STEMS, TRAINABLE_CHOICES
from kerasrot.pipeline import PIPELINES
from kerasrot.training import OPTIMIZERS, SCHEDULES

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
TASKS = ("rotation", "classify")
PRESETS = ("quick", "paper")


class RecipeError(Exception):
    """A recipe, preset or override is wrong; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Setting:
    kind: type
    help: str
    choices: tuple = ()
    minimum: float | None = None
    optional: bool = False  # may be "all"/absent (None)


def _positive(help_, kind=int, optional=False):
    return Setting(kind, help_, minimum=1, optional=optional)


SETTINGS = {
    # what is trained
    "model": Setting(str, "network", tuple(ARCHITECTURES)),
    "stem": Setting(str, "layers before layer1: 3x3 conv (cifar) or 7x7/2 + max-pool (imagenet)", STEMS),
    "dataset": Setting(str, "training and test data", tuple(DATASETS)),
    "image_size": _positive("input height and width; images are resized to it"),
    "images_per_class": _positive("training images per class, fixed seed (\"all\": every image)", optional=True),
    "test_images_per_class": _positive("test images per class (\"all\": the whole test set)", optional=True),
    "samples_per_epoch": _positive("images per epoch, repeating a small subset (\"all\": one pass)", optional=True),
    # how
    "epochs": _positive("training epochs"),
    "batch_size": _positive("images per batch (rotation: before the 4 copies)"),
    "optimizer": Setting(str, "optimiser", OPTIMIZERS),
    "learning_rate": Setting(float, "peak learning rate", minimum=0),
    "momentum": Setting(float, "SGD momentum", minimum=0),
    "nesterov": Setting(bool, "SGD Nesterov momentum"),
    "weight_decay": Setting(float, "decoupled weight decay (Keras' form)", minimum=0),
    "schedule": Setting(str, "learning-rate schedule", SCHEDULES),
    "warmup_epochs": Setting(int, "cosine: epochs of linear warm-up", minimum=0),
    "step_epochs": Setting(list, "step: epochs at which the rate is multiplied by step_gamma"),
    "step_gamma": Setting(float, "step: factor at each step", minimum=0),
    "label_smoothing": Setting(float, "label smoothing of the cross-entropy", minimum=0),
    "augment": Setting(bool, "pad-4-crop and horizontal flip"),
    "seed": Setting(int, "seeds weights, subsets, order and augmentation", minimum=0),
    # speed (results stay the same within tolerance; see kerasrot.backend)
    "data_format": Setting(str, "layout inside the network", DATA_FORMATS),
    "precision": Setting(str, "compute precision", PRECISIONS),
    "fused_batchnorm": Setting(str, "BatchNorm with PyTorch's fused kernel (torch backend only)", FUSED_BATCHNORM),
    "jit_compile": Setting(str, "compile the train step (XLA / torch.compile); auto: JAX only", JIT_COMPILE),
    "pipeline": Setting(str, "input pipeline (\"auto\": memory, see kerasrot.pipeline)", ("auto", *PIPELINES)),
    # stage wiring (set in recipes, not usually overridden)
    "init": Setting(str, "classify: \"random\" or the name of an earlier rotation stage"),
    "trainable": Setting(str, "classify: blocks that train", tuple(TRAINABLE_CHOICES)),
    "verbose": Setting(int, "Keras progress: 0 silent, 1 bar, 2 a line per epoch", (0, 1, 2)),
}
# Settings that do not change what a stage computes: left out of its cache key.
NOT_IN_KEY = ("pipeline", "verbose")
SWEEP_KEY = "labels_per_class"  # figure1: one classify stage per value


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


def available():
    """Recipe names, from the files in `recipes/`."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml") if p.stem != "presets")


def _read_toml(path):
    try:
        return tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{path} is not valid TOML: {error}") from None


def parse_value(key, text, where=None):
    """A `--set` value from text, checked against `SETTINGS[key]`."""
    setting = SETTINGS[key]
    if setting.optional and text.lower() in ("all", "none"):
        return None
    try:
        if setting.kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if setting.kind is list:
            return [int(v) for v in text.split(",") if v.strip()]
        return setting.kind(text)
    except ValueError:
        where = where or f"--set {key}={text}"
        raise RecipeError(f"{where}: expected {setting.kind.__name__} ({setting.help})") from None


def check_value(key, value, where):
    """Raises RecipeError unless `value` suits `SETTINGS[key]`."""
    if key not in SETTINGS:
        raise RecipeError(f"{where}: unknown setting {key!r}; known: {', '.join(sorted(SETTINGS))}")
    setting = SETTINGS[key]
    if value is None and setting.optional:
        return
    kind_ok = isinstance(value, setting.kind) and not (setting.kind is int and isinstance(value, bool))
    if setting.kind is float and isinstance(value, int) and not isinstance(value, bool):
        kind_ok = True
    if not kind_ok:
        raise RecipeError(f"{where}: {key} must be {setting.kind.__name__}, got {value!r}")
    if setting.choices and value not in setting.choices:
        choices = ", ".join(map(str, setting.choices))
        raise RecipeError(f"{where}: {key} must be one of {choices}, got {value!r}")
    if setting.minimum is not None and value < setting.minimum:
        raise RecipeError(f"{where}: {key} must be at least {setting.minimum}, got {value!r}")


def parse_overrides(pairs):
    """`["classify.epochs=3", ...]` -> `{"classify": {"epochs": 3}, ...}`, validated."""
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise RecipeError(f"--set {pair}: expected TASK.KEY=VALUE, e.g. rotation.epochs=3")
        dotted, text = pair.split("=", 1)
        group, _, key = dotted.strip().partition(".")
        if group == "figure1" and key == SWEEP_KEY:
            values = [int(v) for v in text.split(",") if v.strip().isdigit()]
            if not values or any(v < 1 for v in values):
                raise RecipeError(f"--set {pair}: expected positive integers, e.g. 20,100")
            overrides.setdefault("figure1", {})[SWEEP_KEY] = values
            continue
        if group not in TASKS or not key:
            raise RecipeError(
                f"--set {pair}: the key must be rotation.KEY or classify.KEY "
                f"(or figure1.{SWEEP_KEY}), e.g. rotation.epochs=3"
            )
        if key not in SETTINGS:
            raise RecipeError(f"--set {pair}: unknown setting {key!r}; `kerasrot show RECIPE` lists them")
        value = parse_value(key, text.strip(), where=f"--set {pair}")
        check_value(key, value, f"--set {pair}")
        overrides.setdefault(group, {})[key] = value
    return overrides


def load(name, preset="quick", overrides=None):
    """The recipe `name` with `preset`'s settings and the user's overrides, stages keyed."""
    if name not in available():
        raise RecipeError(f"unknown recipe {name!r}; choose one of {', '.join(available())} (kerasrot list)")
    if preset not in PRESETS:
        raise RecipeError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    path = RECIPES_DIR / f"{name}.toml"
    spec = _read_toml(path)
    base = _read_toml(RECIPES_DIR / "presets.toml")[preset]
    changes = spec.get("presets", {}).get(preset, {})
    overrides = overrides or {}
    groups = {}
    for task in TASKS:
        groups[task] = {**base[task], **changes.get(task, {}), **overrides.get(task, {})}
    sweep = overrides.get("figure1", {}).get(SWEEP_KEY) or changes.get("figure1", {}).get(SWEEP_KEY, [])

    stages = []
    for entry in spec["stages"]:
        entry = dict(entry)
        stage_name, task = entry.pop("name"), entry.pop("task")
        if task not in TASKS:
            raise RecipeError(f"{path}: stage {stage_name!r} has unknown task {task!r}")
        repeat = entry.pop("repeat_for", None)
        per_preset = {p: entry.pop(p, {}) for p in PRESETS}
        # Stage-level settings sit between the preset and the user's --set.
        settings = {**groups[task], **entry, **per_preset[preset], **overrides.get(task, {})}
        for value in sweep if repeat == SWEEP_KEY else [None]:
            stage_settings = dict(settings)
            if value is not None:
                stage_settings["images_per_class"] = value
            stages.append(Stage(stage_name.format(n=value), task, stage_settings))

    for stage in stages:
        for key, value in stage.settings.items():
            if SETTINGS.get(key, Setting(str, "")).optional and value == "all":
                stage.settings[key] = value = None  # TOML has no null: "all" means none
            check_value(key, value, f"{name} --preset {preset}, stage {stage.name}")
    key_stages(stages, where=path)
    return Recipe(
        name=name,
        title=spec["title"],
        reproduces=spec["reproduces"],
        preset=preset,
        stages=stages,
        reference=spec.get("reference", {}),
        notes=spec.get("notes", ""),
    )


def key_stages(stages, context=None, where="recipe"):
    """Gives each stage a key: a hash of what decides its result.

    That is its settings, its task, the key of the stage it starts from,
    and `context` (the runner adds the data source and the resolved
    precision and data format).
    """
    keys, by_name = {}, {}
    for stage in stages:
        identity = {k: v for k, v in stage.settings.items() if k not in NOT_IN_KEY}
        identity.update(context or {}, task=stage.task)
        if stage.task == "classify":
            init = stage.settings.get("init", "random")
            if init != "random":
                if init not in keys:
                    raise RecipeError(f"{where}: stage {stage.name!r} starts from {init!r}, no earlier stage")
                identity["init"] = keys[init]
                stage.init_stage = by_name[init]
        stage.key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        keys[stage.name], by_name[stage.name] = stage.key, stage
