"""Stages: carries out a recipe's stages in order, reusing finished ones.

A stage is one call of `kerasrot.training.train`: its data, its model (with
the weights of the stage it starts from), its settings. A probe stage trains
a small classifier on one block's frozen features (`kerasrot.probes`). Each
lives in
`WORKDIR/stages/<task>-<key>/`:

    checkpoints/     Keras' BackupAndRestore files and history.csv while it trains
    model.keras      the trained model, portable (NHWC, float32, stock layers)
    result.json      its accuracy, history, settings and the machine and commit
                     that made it: "this stage is done"

`result.json` is written last, so a stage is either done or resumable.
The key is a hash of the stage's settings (`kerasrot.runner.config.key_stages`):
another recipe with the same rotation stage finds it done and reuses it.
Runs on several machines merge by copying stage folders into one work
directory; a folder may bring its result.json alone, and is then trained
again only if a stage still to run starts from its model.keras.
"""

import dataclasses
import sys
import time
from pathlib import Path

import keras
import numpy as np

from kerasrot import data, folders, frozen, knn, models, probes, training, visualize
from kerasrot.pipeline import Batches
from kerasrot.rotations import NUM_ROTATIONS
from kerasrot.runner import device, distribute, files, provenance, speed
from kerasrot.runner.config import key_stages
from kerasrot.runner.progress import KNN_SHARE, Progress, RunTracker, knn_has_labels, knn_share


class StageError(Exception):
    """A stage could not finish (its loss diverged); the message says which and what is kept."""


@dataclasses.dataclass
class RunCache:
    """What the stages of one run read once and share. A run carries it; nothing outlives the run."""

    folders: dict = dataclasses.field(default_factory=dict)  # resolved path -> `folders.FolderIndex`
    splits: dict = dataclasses.field(default_factory=dict)  # the arguments of `data.load_split` -> its `Split`
    features: dict = dataclasses.field(default_factory=dict)  # a frozen model's block features (one model's)


@dataclasses.dataclass
class RunOptions:
    data_dir: str | None
    workdir: Path
    log: callable = print
    # What made each stage, recorded in its result.json: a stage reused by a
    # later run may have been trained on another machine, or by other code.
    machine: str = dataclasses.field(default_factory=device.description)
    devices: str = dataclasses.field(default_factory=distribute.description)  # those sharing each batch
    commit: str = dataclasses.field(default_factory=provenance.git_commit)
    cache: RunCache = dataclasses.field(default_factory=RunCache)
    tensorboard: Path | None = None  # where each stage writes TensorBoard logs, DIR/<stage>/


def stage_dir(workdir, stage):
    return Path(workdir) / "stages" / f"{stage.task}-{stage.key}"


def resolve_stages(recipe, options):
    """Fills in "auto" settings for this machine and keys the stages with the data they read."""
    folder_fingerprints = {}
    for stage in recipe.stages:
        speed.resolve(stage.settings)
        resolve_knn_monitor(stage)
        if stage.settings["verbose"] == 1 and not sys.stdout.isatty():
            stage.settings["verbose"] = 2  # a progress bar in a log file is one line per step
        folder_fingerprints.update(resolve_data(stage.settings, options.cache))
    data_source = str(Path(options.data_dir).resolve()) if options.data_dir else "tfds"
    # A folder's fingerprint changes with its files: a stage trained before they changed is not reused.
    key_stages(recipe.stages, context={"data": data_source, "backend": keras.backend.backend(),
                                       **({"folders": folder_fingerprints} if folder_fingerprints else {})})


def resolve_knn_monitor(stage):
    """Turns a rotation stage's `knn_monitor = "auto"` into "on" or "off" (in place)."""
    s = stage.settings
    if s.get("knn_monitor", "off") == "off":
        return
    if not knn_has_labels(s):
        if s["knn_monitor"] == "on":
            raise data.DataError(f"rotation.knn_monitor=on needs labelled data, and {s['dataset']} is read without "
                                 "labels for rotation; set it to off")
        s["knn_monitor"] = "off"
    elif s["knn_monitor"] == "auto":
        s["knn_monitor"] = "on" if knn_share(stage) <= KNN_SHARE else "off"


def knn_monitor(stage, train, test):
    """The stage's `kerasrot.knn.KnnMonitor` (in a list; none where it is off): neighbours from a balanced
    labelled subset of its train split, scored on its test images (`test`: the stage's test batches)."""
    s = stage.settings
    if stage.task != "rotation" or s["knn_monitor"] != "on":
        return []
    per_class = min(s["knn_images_per_class"], *np.bincount(train.labels))  # no more than a class has
    neighbours = train.subset(data.balanced_subset(train.labels, per_class, s["seed"]))
    return [knn.KnnMonitor(s["knn_block"], neighbours.images, neighbours.labels, test.images, test.labels,
                           batch_size=s["batch_size"])]


def resolve_data(settings, cache):
    """An own folder's absolute path and "auto" streaming, in place -> `{path: fingerprint}` of folders read.

    Scanning the folder here, before any training, stops a run with bad files at once.
    """
    stream = settings.get("streaming")  # a probe has none: it trains on cached features
    if not settings["dataset"].startswith(data.FOLDER):
        if stream == "auto":
            settings["streaming"] = "off"
        return {}
    index = folders.scan(settings["dataset"][len(data.FOLDER):], known=cache.folders)
    settings["dataset"] = f"{data.FOLDER}{index.root}"
    if stream == "auto":
        settings["streaming"] = "on" if folders.needs_streaming(index, settings["image_size"]) else "off"
    return {str(index.root): index.fingerprint}


def load_data(settings, options, task):
    """Train and test `Split`s of the stage's dataset, subset as its settings say (each split read once a run)."""
    splits = []
    for split, key in (("train", "images_per_class"), ("test", "test_images_per_class")):
        # The built-in datasets have labels: one read of a split serves rotation and classification alike.
        labelled = task != "rotation" or settings["dataset"] in data.DATASETS
        read = (settings["dataset"], split, settings["image_size"], options.data_dir, labelled,
                settings.get("streaming") == "on", settings.get("bad_images", "error"))
        if read not in options.cache.splits:
            options.cache.splits[read] = data.load_split(*read, scans=options.cache.folders)
        whole = options.cache.splits[read]
        try:
            chosen = data.balanced_subset(whole.labels, settings[key], settings["seed"])
        except data.DataError as error:  # say which setting asks for too many, and what to do
            raise data.DataError(f"{task}.{key}={settings[key]}: {error} in the {split} split of "
                                 f"{settings['dataset']}; set it lower or to all") from None
        splits.append(whole.subset(chosen))
    return splits


def make_batches(stage, train, test):
    s = stage.settings
    common = dict(batch_size=s["batch_size"], rotations=stage.task == "rotation", seed=s["seed"])
    # With several machines (--data-parallel) each process feeds its share of
    # every training batch. Test batches stay whole on every process:
    # training.accuracy predicts them on each, and whole they cost no accuracy.
    train_batches = Batches(train.images, train.labels, augment=s["augment"], shuffle=True,
                            epoch_length=s["samples_per_epoch"], process_shard=distribute.process_shard(), **common)
    test_batches = Batches(test.images, test.labels, **common)
    distribute.check_batches(stage, train_batches, test_batches)  # the last, shorter batches split too
    return train_batches, test_batches


def network(settings, num_classes, name, fast=True):
    """The stage's network: in its fast layout (`speed`), or Keras' defaults for the saved copy."""
    s = settings
    if not fast:
        return models.build_model(s["model"], num_classes, s["stem"], s["image_size"], name=name)
    model = models.build_model(s["model"], num_classes, s["stem"], s["image_size"],
                               data_format=s["data_format"], dtype=s["precision"], name=name)
    return speed.with_fast_layers(model, **{key: s[key] == "on" for key in speed.FAST_LAYERS})


def initial_model(stage, workdir, num_classes):
    """The stage's model with its init weights and trainable blocks."""
    s = stage.settings
    keras.utils.set_random_seed(s["seed"])
    model = network(s, num_classes, name=f"{s['model']}_{stage.task}_{data.dataset_tag(s['dataset'])}")
    if stage.task == "classify" and s["init"] != "random":
        source = keras.saving.load_model(stage_dir(workdir, stage.init_stage) / "model.keras")
        models.transfer_weights(source, model, skip_blocks=("head",))
    return models.set_trainable(model, s["trainable"] if stage.task == "classify" else "all")


def probe_data(stage, options, tracker=None):
    """Every block's features of the stage's frozen model, for its train and test images (`kerasrot.probes`).

    The probes of one model share them: the run's cache keeps the last model's.
    """
    s, cached = stage.settings, options.cache.features
    source = stage.init_stage.key if stage.init_stage else f"random {s['model']} {s['stem']} seed {s['seed']}"
    key = (source, s["dataset"], s["image_size"], s["images_per_class"], s["test_images_per_class"], s["seed"],
           s["batch_size"], options.data_dir)
    if key not in cached:
        cached.clear()
        if stage.init_stage:
            model = keras.saving.load_model(stage_dir(options.workdir, stage.init_stage) / "model.keras")
        else:  # random weights: those the rotation model starts from (same seed, same draws)
            keras.utils.set_random_seed(s["seed"])
            model = models.build_model(s["model"], NUM_ROTATIONS, s["stem"], s["image_size"])
        train, test = load_data(s, options, stage.task)
        if tracker:
            tracker.read(stage, len(train), len(test))
        extract = [Batches(split.images, split.labels, s["batch_size"]) for split in (train, test)]
        tick = tracker.counter("features of every block, once", "block features", len(train) + len(test)) \
            if tracker else None
        cached[key] = ([probes.block_features(model, batches, on_batch=tick) for batches in extract], train, test)
    return cached[key]


def stage_model_and_data(stage, options, tracker=None):
    """`(model, train batches, test batches, train split)` of a stage, the model with its init weights."""
    s = stage.settings
    if stage.task == "probe":
        ((train_features, train_labels), (test_features, test_labels)), train, _ = probe_data(stage, options, tracker)
        block = s["block"]
        keras.utils.set_random_seed(s["seed"])
        cells, channels = train_features[block].shape[1:]
        model = probes.probe(s["probe"], cells, channels, len(train.class_names), name=f"{s['probe']}_probe_{block}")
        train_batches = Batches(train_features[block], train_labels, s["batch_size"], shuffle=True, seed=s["seed"])
        test_batches = Batches(test_features[block], test_labels, s["batch_size"])
        distribute.check_batches(stage, train_batches, test_batches)
        return model, train_batches, test_batches, train
    train, test = load_data(s, options, stage.task)
    if tracker:
        tracker.read(stage, len(train), len(test))
    if train.skipped:
        options.log(f"left out {len(train.skipped)} unreadable image file(s) (bad_images=skip): "
                    + ", ".join(name for name, _ in train.skipped[:3]) + (" ..." if len(train.skipped) > 3 else ""))
    num_classes = NUM_ROTATIONS if stage.task == "rotation" else len(train.class_names)
    train_batches, test_batches = make_batches(stage, train, test)
    return initial_model(stage, options.workdir, num_classes), train_batches, test_batches, train


def saved_copy(stage, model):
    """The model saved for users: a network in Keras' default layout (NHWC, float32, stock layers)."""
    if stage.task == "probe":
        return model
    portable = network(stage.settings, model.output_shape[-1], name=model.name, fast=False)
    models.transfer_weights(model, portable, skip_blocks=())
    return portable


def on_frozen_outputs(model, train_batches, test_batches, tracker):
    """`(trainable part, train, test batches of the frozen part's outputs)` (`kerasrot.frozen`).

    The frozen part runs once over every train and test image; the batches
    of its outputs keep the images' order, epoch by epoch.
    """
    frozen_part, trainable_part = frozen.split_at_frozen(model)
    tick = tracker.counter("frozen part, once", "frozen part", len(train_batches.images) + len(test_batches.images))
    outputs = []
    for batches in (train_batches, test_batches):
        every_image = Batches(batches.images, batches.labels, batches.batch_size)  # once each, in order
        outputs.append(batches.of(frozen.frozen_outputs(frozen_part, every_image, on_batch=tick)[0]))
    return (trainable_part, *outputs)


def tensorboard(stage, options):
    """Keras' TensorBoard callback for the stage (in a list; none without --tensorboard)."""
    if options.tensorboard is None:
        return []
    return [keras.callbacks.TensorBoard(str(options.tensorboard / stage.name), write_graph=False)]


def run_stage(stage, options, tracker):
    """Trains one stage (or resumes it) and returns its result dict."""
    s = stage.settings
    directory = stage_dir(options.workdir, stage)
    model, train_batches, test_batches, train = stage_model_and_data(stage, options, tracker)
    fitted, train_data, test_data = model, train_batches, test_batches
    if stage.task == "classify" and frozen.computed_once(s["trainable"], s["augment"]):
        fitted, train_data, test_data = on_frozen_outputs(model, train_batches, test_batches, tracker)
    training.compile_model(fitted, s, steps_per_epoch=len(train_data))
    speed.prepare_to_train(fitted, s, log=options.log)
    train_data, test_data = device.fed(train_data), device.fed(test_data)
    start = time.perf_counter()
    try:
        history = training.train(fitted, train_data, test_data, s, directory / "checkpoints",
                                 callbacks=[Progress(tracker, train_data, test_data), *tensorboard(stage, options)],
                                 epoch_logs=knn_monitor(stage, train, test_batches), log=options.log)
    except training.Diverged as error:
        kept = f"the checkpoint of epoch {error.epoch - 1} stays in {directory / 'checkpoints'}" if error.epoch > 1 \
            else "no epoch finished"
        raise StageError(
            f"stage {stage.name} diverged: {error}; {kept}, no result written. "
            f"Try a lower {stage.task}.learning_rate"
        ) from None
    portable = saved_copy(stage, model)
    per_batch = test_batches.num_samples / len(test_batches) * tracker.cost("test of the saved model")
    test_accuracy = training.accuracy(portable, device.fed(test_batches), on_batch=lambda: tracker.advance(
        per_batch, lambda: "testing the saved model"))
    files.save_model(portable, directory / "model.keras")
    result = {
        "name": stage.name,
        "task": stage.task,
        "key": stage.key,
        "accuracy": round(test_accuracy, 2),
        "test_samples": test_batches.num_samples,
        "train_images": len(train),
        **({"class_names": list(train.class_names)} if stage.task != "rotation" else {}),
        "settings": s,
        "history": history,
        "train_seconds": round(sum(e["seconds"] for e in history), 1),
        "wall_seconds_this_run": round(time.perf_counter() - start, 1),
        "data_source": train.source,
        **({"skipped_images": {"count": len(train.skipped), "files": [f"{name} ({why})" for name, why in
                                                                        train.skipped[:100]]}}
           if train.skipped else {}),
        "backend": keras.backend.backend(),
        "device": options.machine,
        "devices": options.devices,
        "commit": options.commit,
        "checkpoint": str(directory / "model.keras"),
    }
    files.write_json(directory / "result.json", result)
    files.remove_tree(directory / "checkpoints")
    return result


def look_inside(recipe, options):
    """`{file name: figure}`: the attention maps and first-layer filters of the networks the recipe's
    `[report.look_inside]` names (`kerasrot.visualize`); none where it names none."""
    spec = recipe.report.get("look_inside")
    if not spec:
        return {}
    by_name = {stage.name: stage for stage in recipe.stages}
    networks = {}
    for title, name in spec["networks"].items():
        if name == "random":  # the random weights a stage starts from (same seed, same draws)
            s = by_name[spec["random_start_of"]].settings
            keras.utils.set_random_seed(s["seed"])
            networks[title] = models.build_model(s["model"], NUM_ROTATIONS, s["stem"], s["image_size"])
        elif (stage_dir(options.workdir, by_name[name]) / "model.keras").exists():
            networks[title] = keras.saving.load_model(stage_dir(options.workdir, by_name[name]) / "model.keras")
        else:  # a stage brought from another machine as its result.json alone
            options.log(f"no attention.png or filters.png: stage {name}'s model.keras is not in {options.workdir}")
            return {}
    _, test = load_data(by_name[spec["images_of"]].settings, options, "classify")
    shown = visualize.pick_images(test.labels)
    images, labels = test.images[shown], test.labels[shown]
    return {"attention.png": visualize.plot_attention(networks, images, labels, test.class_names),
            "filters.png": visualize.plot_filters(networks)}


def models_still_needed(stages, workdir):
    """`{name of a done stage: a stage to run that starts from it}` where the done one's model.keras is missing.

    A stage folder copied from another machine may bring only its result.json
    (small, where the model is tens of MB): enough to report it, not to start
    another stage from it.
    """
    def has(stage, name):
        return (stage_dir(workdir, stage) / name).exists()

    needed = {}
    # Last stage first: a stage comes after the one it starts from, so whether
    # it runs (and needs that one's model) is known when its source is reached.
    for stage in reversed(stages):
        source, to_run = stage.init_stage, not has(stage, "result.json") or stage.name in needed
        if to_run and source and has(source, "result.json") and not has(source, "model.keras"):
            needed[source.name] = stage.name  # the first such stage is the last one set
    return needed


def run_recipe(recipe, options):
    """Runs every stage of `recipe` (those already done are read back) -> stage results."""
    resolve_stages(recipe, options)
    tracker = RunTracker(recipe.stages, options.log, plain=not sys.stdout.isatty())
    results = {}
    total = len(recipe.stages)
    with files.workdir_lock(options.workdir):
        retrain = models_still_needed(recipe.stages, options.workdir)
        for index, stage in enumerate(recipe.stages, start=1):
            done = stage_dir(options.workdir, stage) / "result.json"
            if stage.name in retrain:
                options.log(f"[stage {index}/{total}] {stage.name}: {done.parent} has its result.json but no "
                            f"model.keras, which {retrain[stage.name]} starts from: training it again")
            elif done.exists():
                files.remove_tree(done.parent / "checkpoints")  # killed while tidying up
                results[stage.name] = {**files.read_json(done), "name": stage.name, "cached": True}
                tracker.skip(stage)
                options.log(f"[stage {index}/{total}] {stage.name}: done before, "
                            f"reusing {done.parent} ({results[stage.name]['accuracy']:.2f}%)")
                continue
            tracker.start_stage(stage, index, total)
            result = run_stage(stage, options, tracker)
            results[stage.name] = {**result, "cached": False}
            tracker.finish_stage()
            options.log(f"[stage {index}/{total}] {stage.name}: test accuracy {result['accuracy']:.2f}%")
    return results
