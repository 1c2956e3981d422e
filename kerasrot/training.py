"""Training: compile, then `model.fit` with Keras' own callbacks for the chores.

`compile_model` gives a model its optimiser, learning-rate schedule, loss
and metric; `train` fits a compiled model for one stage. Keras' callbacks
do the chores:

* `BackupAndRestore` saves the model and its optimizer state after every
  epoch; a killed run, started again, resumes at the last finished epoch.
  `double_checkpoint=True` keeps the previous epoch's files too, so a kill
  while it writes loses nothing.
* `CSVLogger(append=True)` writes the per-epoch history (loss, accuracy,
  test accuracy, learning rate, seconds), kept across resumes, so curves
  show how fast each initialisation learns.
* `TerminateOnNaN(raise_error=True)` stops at the first non-finite loss.

The hyperparameters are a dict, as a recipe gives them
(`kerasrot.runner.config`): `optimizer` is "sgd" (momentum, optional
Nesterov) or "adamw"; `schedule` is "constant", "step" (x`step_gamma` at
each of `step_epochs`) or "cosine" (with `warmup_epochs` of linear warm-up:
a one-cycle schedule). `weight_decay` is Keras' decoupled decay
(`w -= lr * wd * w` each step), for every optimiser; with SGD momentum 0.9
it is about ten times weaker than the same number in PyTorch's coupled L2
form, and the presets account for that. `global_clipnorm` (0: off) is
Keras' own: when all the gradients together have a larger norm, they are
scaled down to it before the update.
"""

import csv
import math
import time
from pathlib import Path

import keras
import numpy as np

from kerasrot.pipeline import EpochSetter

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "step", "cosine")


def learning_rate_schedule(settings, steps_per_epoch):
    """The learning rate as a `keras.optimizers.schedules` object (saved with the model)."""
    lr = settings["learning_rate"]
    kind = settings["schedule"]
    total = settings["epochs"] * steps_per_epoch
    if kind == "constant":
        return lr
    if kind == "step":
        boundaries = [e * steps_per_epoch for e in settings["step_epochs"]]
        values = [lr * settings["step_gamma"] ** i for i in range(len(boundaries) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    warmup = min(settings["warmup_epochs"] * steps_per_epoch, total - 1)
    return WarmupCosineDecay(
        initial_learning_rate=lr / 10 if warmup else lr,
        decay_steps=max(total - warmup, 1),
        warmup_target=lr if warmup else None,
        warmup_steps=warmup,
    )


@keras.saving.register_keras_serializable(package="kerasrot")
class WarmupCosineDecay(keras.optimizers.schedules.CosineDecay):
    """Keras' CosineDecay with its warm-up, chosen by `where` instead of `cond`: the same rates.

    `ops.cond` on the torch backend asks the step tensor for a Python bool,
    which waits for the GPU each step and cannot be recorded in a CUDA
    graph (`kerasrot.runner.cuda_graphs`). Both branches are cheap scalars.
    """

    def __call__(self, step):
        if self.warmup_target is None:
            return super().__call__(step)
        ops = keras.ops
        initial = ops.convert_to_tensor(self.initial_learning_rate)
        dtype = initial.dtype
        warmup_steps, decay_steps = ops.cast(self.warmup_steps, dtype), ops.cast(self.decay_steps, dtype)
        target = ops.cast(self.warmup_target, dtype)
        step = ops.minimum(ops.cast(step, dtype), decay_steps + warmup_steps)
        warmup = self._warmup_function(step, warmup_steps, target, initial)
        decay = self._decay_function(step - warmup_steps, decay_steps, target, dtype)
        return ops.where(step < warmup_steps, warmup, decay)


def make_optimizer(settings, steps_per_epoch):
    schedule = learning_rate_schedule(settings, steps_per_epoch)
    decay = settings["weight_decay"] or None
    # A rare batch can have a gradient 20x the usual; clipping its global
    # norm keeps that one step from undoing a short run's progress.
    clip = settings["global_clipnorm"] or None
    if settings["optimizer"] == "sgd":
        return keras.optimizers.SGD(schedule, momentum=settings["momentum"], nesterov=settings["nesterov"],
                                    weight_decay=decay, global_clipnorm=clip)
    return keras.optimizers.AdamW(schedule, weight_decay=settings["weight_decay"], global_clipnorm=clip)


@keras.saving.register_keras_serializable(package="kerasrot")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy from logits and integer labels, with label smoothing.

    Keras' SparseCategoricalCrossentropy has no `label_smoothing`, and
    CategoricalCrossentropy wants one-hot labels; this takes integer labels.
    """

    def __init__(self, label_smoothing=0.1, name="smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        labels = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, [-1]), "int32"), y_pred.shape[-1])
        return keras.losses.categorical_crossentropy(
            labels, y_pred, from_logits=True, label_smoothing=self.label_smoothing
        )

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def make_loss(settings):
    if settings["label_smoothing"]:
        return SmoothedSparseCrossentropy(settings["label_smoothing"])
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


JIT_COMPILE = {"on": True, "off": False, "auto": "auto"}  # "auto": Keras' choice (XLA on JAX and TensorFlow)


def compile_model(model, settings, steps_per_epoch):
    """Compiles `model` with the optimiser, schedule and loss of `settings` -> the model.

    `settings` holds `epochs` and every hyperparameter this module reads
    (those of a recipe's stage, or a dict of your own as in
    examples/rotnet_table2.py); `steps_per_epoch` turns epochs into steps.
    """
    model.compile(
        optimizer=make_optimizer(settings, steps_per_epoch),
        loss=make_loss(settings),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=JIT_COMPILE[settings["jit_compile"]],
    )
    return model


class Diverged(Exception):
    """The training loss (or the test loss after an epoch) became NaN or infinite."""

    def __init__(self, epoch, loss, batch=None, test=False):
        where = f"in epoch {epoch} (batch {batch + 1})" if batch is not None else f"after epoch {epoch}"
        super().__init__(f"the {'test ' if test else ''}loss became {loss} {where}")
        self.epoch, self.loss, self.batch = epoch, loss, batch


class StopOnDivergence(keras.callbacks.TerminateOnNaN):
    """`TerminateOnNaN(raise_error=True)`, raising `Diverged` that names the epoch.

    Raising matters: the default (`stop_training = True`) ends the epoch
    normally, so the callbacks after it would save the diverged weights as
    a checkpoint and `BackupAndRestore` would then delete its backup.
    An exception stops `fit` before either (tests/test_training.py).

    TerminateOnNaN watches the training loss of each batch, which is
    computed before that batch's update: weights that the last update of an
    epoch makes non-finite show only in the test loss, so that is checked
    at the end of every epoch, before the checkpoint is written.
    """

    def __init__(self):
        super().__init__(raise_error=True)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_batch_end(self, batch, logs=None):
        try:
            super().on_batch_end(batch, logs)
        except RuntimeError:
            raise Diverged(self.epoch, (logs or {}).get("loss"), batch=batch) from None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        # The epoch's mean loss catches a last batch that a batch check saw
        # too late: with CUDA graphs the batch logs are one step behind.
        if logs.get("loss") is not None and not math.isfinite(logs["loss"]):
            raise Diverged(self.epoch, logs["loss"])
        test_loss = logs.get("val_loss")
        if test_loss is not None and not math.isfinite(test_loss):
            raise Diverged(self.epoch, test_loss, test=True)


class EpochRecord(keras.callbacks.Callback):
    """Adds the learning rate and the epoch's seconds to the logs that CSVLogger writes.

    (As `keras.callbacks.LearningRateScheduler` adds `learning_rate`.) Also
    says so when a run resumes: Keras' BackupAndRestore does so silently.
    """

    def __init__(self, epochs, log):
        super().__init__()
        self.epochs, self.log = epochs, log

    def on_train_begin(self, logs=None):
        self.first_epoch = True

    def on_epoch_begin(self, epoch, logs=None):
        if self.first_epoch and epoch > 0:  # BackupAndRestore moved the start
            self.log(f"resuming from the checkpoint of epoch {epoch}/{self.epochs}")
        self.first_epoch = False
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["seconds"] = round(time.perf_counter() - self.start, 2)


def train(model, train_batches, test_batches, settings, checkpoint_dir, callbacks=(), epoch_logs=(), log=print):
    """Fits a compiled `model` for `settings["epochs"]` (resuming from `checkpoint_dir`) -> its history.

    Args:
        model: a model compiled by `compile_model`, its trainable blocks set.
        train_batches, test_batches: `kerasrot.pipeline.Batches`; `test` is
            evaluated after every epoch.
        settings: the stage's settings; `train` reads `epochs`, `pipeline`
            ("memory" or "tfdata", `kerasrot.pipeline`) and `verbose`.
        checkpoint_dir: where the backup and history.csv live until the stage is done.
        callbacks: more Keras callbacks (progress reports), run after the checkpoint of each epoch.
        epoch_logs: callbacks that add numbers to each epoch's logs (a kNN
            monitor, `kerasrot.knn`), run before its row of history is written.

    Returns the history: one dict per epoch, `epoch` counted from 1.
    Raises `Diverged` if the loss becomes NaN or infinite; the checkpoint
    of the last finished epoch stays in `checkpoint_dir`.
    """
    checkpoint_dir = Path(checkpoint_dir)
    history_csv = checkpoint_dir / "history.csv"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if settings["pipeline"] == "tfdata":
        train_data, test_data = train_batches.as_tf_dataset(), test_batches.as_tf_dataset()
    else:
        train_data, test_data = train_batches, test_batches
    model.fit(
        train_data,
        epochs=settings["epochs"],
        # The plan of `train_batches` orders the images from (seed, epoch); Keras'
        # default shuffles the batch order with Python's global `random`,
        # which a resumed run cannot repeat.
        shuffle=False,
        validation_data=test_data,
        callbacks=[
            EpochSetter(train_batches),
            StopOnDivergence(),
            EpochRecord(settings["epochs"], log),
            *epoch_logs,
            # CSVLogger before BackupAndRestore: killed between the two, an
            # epoch has its row but no checkpoint, runs again and is logged
            # twice; `read_history` keeps the later row. (The other order
            # would lose that epoch's row instead.)
            keras.callbacks.CSVLogger(str(history_csv), append=True),
            # Kept after fit (delete_checkpoint=False) until the stage's
            # result is safely written; the runner removes it then.
            keras.callbacks.BackupAndRestore(str(checkpoint_dir), double_checkpoint=True, delete_checkpoint=False),
            *callbacks,
        ],
        verbose=settings["verbose"],
    )
    return read_history(history_csv)


def read_history(path):
    """CSVLogger's rows as dicts with `epoch` from 1; for an epoch logged twice, the later row."""
    by_epoch = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            record = {key: float(value) for key, value in row.items()}
            record["epoch"] = int(record["epoch"]) + 1
            by_epoch[record["epoch"]] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def accuracy(model, batches, on_batch=None):
    """Top-1 accuracy in percent of `model` on every sample of `batches`; `on_batch()` after each batch."""
    correct = total = 0
    for i in range(len(batches)):
        images, labels = batches[i]
        predicted = np.argmax(keras.ops.convert_to_numpy(model.predict_on_batch(images)), axis=-1)
        labels = keras.ops.convert_to_numpy(labels)
        correct += int(np.sum(predicted == labels))
        total += len(labels)
        if on_batch:
            on_batch()
    return 100.0 * correct / total
