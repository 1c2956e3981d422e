"""Runner: carries out a recipe's stages in order, reusing finished ones.

Each stage lives in `WORKDIR/stages/<task>-<key>/`:

    checkpoints/     per-epoch checkpoints while it trains (resume from here)
    model.keras      the trained model, portable (NHWC, float32)
    result.json      its accuracy, history and settings: "this stage is done"

`result.json` is written last, so a stage is either done or resumable.
The key is a hash of the stage's settings (`kerasrot.recipes.key_stages`):
another recipe with the same rotation stage finds it done and reuses it.
"""

import dataclasses
import sys
import time
from pathlib import Path

import keras

from kerasrot import backend, data, files, models, training
from kerasrot.pipeline import NUM_ROTATIONS, Batches, default_pipeline
from kerasrot.recipes import key_stages


@dataclasses.dataclass
class RunOptions:
    data_dir: str | None
    workdir: Path
    pipeline: str | None = None  # None: the recipe's setting ("auto")
    log: callable = print


def stage_dir(workdir, stage):
    return Path(workdir) / "stages" / f"{stage.task}-{stage.key}"


def resolve_stages(recipe, options):
    """Fills in "auto" settings for this machine and keys the stages with the data source."""
    for stage in recipe.stages:
        s = stage.settings
        s["data_format"], s["precision"], s["fused_batchnorm"] = backend.resolve(
            s["data_format"], s["precision"], s["fused_batchnorm"]
        )
        s["jit_compile"] = backend.resolve_jit_compile(s["jit_compile"])
        if options.pipeline:
            s["pipeline"] = options.pipeline
        if s["pipeline"] == "auto":
            s["pipeline"] = default_pipeline()
        if s["verbose"] == 1 and not sys.stdout.isatty():
            s["verbose"] = 2  # a progress bar in a log file is one line per step
    data_source = str(Path(options.data_dir).resolve()) if options.data_dir else "tfds"
    key_stages(recipe.stages, context={"data": data_source, "backend": backend.name()})


def model_spec(settings, num_classes):
    return {
        "arch": settings["model"],
        "num_classes": num_classes,
        "stem": settings["stem"],
        "image_size": settings["image_size"],
    }


def load_data(settings, options):
    """Train and test `Split`s of the stage's dataset, subset as its settings say."""
    splits = []
    for split, per_class in (("train", settings["images_per_class"]), ("test", settings["test_images_per_class"])):
        whole = data.load_split(settings["dataset"], split, settings["image_size"], options.data_dir)
        splits.append(whole.subset(data.balanced_subset(whole.labels, per_class, settings["seed"])))
    return splits


def make_batches(stage, train, test):
    s = stage.settings
    rotations = stage.task == "rotation"
    common = dict(batch_size=s["batch_size"], rotations=rotations, seed=s["seed"], pipeline=s["pipeline"])
    train_batches = Batches(
        train.images, train.labels, augment=s["augment"], shuffle=True,
        epoch_length=s["samples_per_epoch"], **common,
    )
    test_batches = Batches(test.images, test.labels, **common)
    return train_batches, test_batches


def build_stage_model(stage, workdir, num_classes):
    """The stage's model in its training layout, with its init weights and trainable blocks."""
    s = stage.settings
    keras.utils.set_random_seed(s["seed"])
    name = f"{s['model']}_{stage.task}_{s['dataset']}"
    with backend.layout(s["data_format"], s["precision"], s["fused_batchnorm"]):
        model = models.build_model(**model_spec(s, num_classes), name=name)
    if stage.task == "classify" and s["init"] != "random":
        source = keras.saving.load_model(stage_dir(workdir, stage.init_stage) / "model.keras")
        models.transfer_weights(source, model, skip_blocks=("head",))
    models.set_trainable(model, s["trainable"] if stage.task == "classify" else "all")
    return model


def run_stage(stage, options, callbacks=()):
    """Trains one stage (or resumes it) and returns its result dict."""
    s = stage.settings
    directory = stage_dir(options.workdir, stage)
    train, test = load_data(s, options)
    num_classes = NUM_ROTATIONS if stage.task == "rotation" else len(train.class_names)
    train_batches, test_batches = make_batches(stage, train, test)
    model = build_stage_model(stage, options.workdir, num_classes)
    start = time.perf_counter()
    model, history = training.fit_and_evaluate(
        model, train_batches, test_batches, s, directory / "checkpoints",
        callbacks=callbacks, log=options.log,
    )
    portable = models.export(model, model_spec(s, num_classes))
    test_accuracy = training.accuracy(portable, test_batches)
    files.save_model(portable, directory / "model.keras")
    result = {
        "name": stage.name,
        "task": stage.task,
        "key": stage.key,
        "accuracy": round(test_accuracy, 2),
        "test_samples": test_batches.num_samples,
        "train_images": len(train),
        "settings": s,
        "history": history,
        "train_seconds": round(sum(e["seconds"] for e in history), 1),
        "wall_seconds_this_run": round(time.perf_counter() - start, 1),
        "data_source": train.source,
        "backend": backend.name(),
        "checkpoint": str(directory / "model.keras"),
    }
    files.write_json(directory / "result.json", result)
    training.remove_checkpoints(directory / "checkpoints")
    return result


def planned_samples(stage):
    """Training samples a stage will process: its share of the time-left estimate."""
    s = stage.settings
    per_epoch = s["samples_per_epoch"] or (s["images_per_class"] or 5000) * 10
    if stage.task == "rotation":
        per_epoch *= NUM_ROTATIONS
    cost = 0.5 if s.get("trainable") != "all" and stage.task == "classify" else 1.0
    return per_epoch * s["epochs"] * cost


class Progress(keras.callbacks.Callback):
    """Prints, after each epoch, how far the whole run is and the time left."""

    def __init__(self, tracker):
        super().__init__()
        self.tracker = tracker

    def on_epoch_end(self, epoch, logs=None):
        self.tracker.epoch_done()


class RunTracker:
    """Estimates the time left from the training speed seen so far in this run."""

    def __init__(self, stages, log):
        self.todo = {stage.name: planned_samples(stage) for stage in stages}
        self.log = log
        self.done_samples = 0.0
        self.seconds = 0.0
        self.current = None
        self._epoch_start = None

    def start_stage(self, stage, index, total):
        self.current = stage
        self._epoch_start = time.perf_counter()
        s = stage.settings
        what = f"{s['model']} ({s['stem']} stem) on {s['dataset']}"
        if stage.task == "classify":
            what += f", init {s['init']}, trainable {s['trainable']}"
        self.log(f"[stage {index}/{total}] {stage.name}: {stage.task} {what}; {self.eta()}")

    def epoch_done(self):
        now = time.perf_counter()
        per_epoch = planned_samples(self.current) / self.current.settings["epochs"]
        self.done_samples += per_epoch
        self.seconds += now - self._epoch_start
        self.todo[self.current.name] -= per_epoch
        self._epoch_start = now
        self.log(f"  {self.current.name}: {self.eta()}")

    def skip(self, stage):
        self.todo[stage.name] = 0

    def eta(self):
        left = sum(max(v, 0) for v in self.todo.values())
        if not self.done_samples:
            return "time left: estimated after the first epoch"
        minutes = left * self.seconds / self.done_samples / 60
        return f"about {minutes:.0f} min left in this run" if minutes >= 1 else "under a minute left"


def run_recipe(recipe, options):
    """Runs every stage of `recipe` (those already done are read back) -> stage results."""
    resolve_stages(recipe, options)
    tracker = RunTracker(recipe.stages, options.log)
    results = {}
    with files.workdir_lock(options.workdir):
        for index, stage in enumerate(recipe.stages, start=1):
            done = stage_dir(options.workdir, stage) / "result.json"
            if done.exists():
                training.remove_checkpoints(done.parent / "checkpoints")  # killed while tidying up
                results[stage.name] = {**files.read_json(done), "name": stage.name, "cached": True}
                tracker.skip(stage)
                options.log(
                    f"[stage {index}/{len(recipe.stages)}] {stage.name}: done before, "
                    f"reusing {done.parent} ({results[stage.name]['accuracy']:.2f}%)"
                )
                continue
            tracker.start_stage(stage, index, len(recipe.stages))
            result = run_stage(stage, options, callbacks=[Progress(tracker)])
            results[stage.name] = {**result, "cached": False}
            tracker.skip(stage)
            options.log(f"[stage {index}/{len(recipe.stages)}] {stage.name}: test accuracy {result['accuracy']:.2f}%")
    return results
