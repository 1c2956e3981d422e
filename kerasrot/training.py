"""Training: compile, fit with a checkpoint every epoch, resume, evaluate.

One function, `fit_and_evaluate`, is a stage's training. It records a
per-epoch history (train loss and accuracy, test accuracy, learning rate,
seconds), so curves show how fast each initialisation learns, and it saves
the model, its optimizer state and the history after every epoch, so a
killed run resumes at the last finished epoch.

Optimiser and schedule come from the recipe (`kerasrot.recipes`):
`optimizer` is "sgd" (momentum, optional Nesterov), "adam" or "adamw";
`schedule` is "constant", "step" (x`step_gamma` at each of `step_epochs`)
or "cosine" (with `warmup_epochs` of linear warm-up: a one-cycle schedule).
`weight_decay` is Keras' decoupled decay (`w -= lr * wd * w` each step),
which for SGD with momentum 0.9 is about ten times weaker than the same
number in PyTorch's coupled L2 form; the recipes' values account for that.
"""

import shutil
import time
from pathlib import Path

import keras
import numpy as np

from kerasrot import files
from kerasrot.pipeline import EpochSetter

OPTIMIZERS = ("sgd", "adam", "adamw")
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
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=lr / 10 if warmup else lr,
        decay_steps=max(total - warmup, 1),
        warmup_target=lr if warmup else None,
        warmup_steps=warmup,
    )


def make_optimizer(settings, steps_per_epoch):
    schedule = learning_rate_schedule(settings, steps_per_epoch)
    decay = settings["weight_decay"] or None
    if settings["optimizer"] == "sgd":
        return keras.optimizers.SGD(
            schedule, momentum=settings["momentum"], nesterov=settings["nesterov"], weight_decay=decay
        )
    if settings["optimizer"] == "adam":
        return keras.optimizers.Adam(schedule, weight_decay=decay)
    return keras.optimizers.AdamW(schedule, weight_decay=settings["weight_decay"])


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


def compile_model(model, settings, steps_per_epoch):
    model.compile(
        optimizer=make_optimizer(settings, steps_per_epoch),
        loss=make_loss(settings),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=settings["jit_compile"] == "on",
    )
    return model


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: saves the model (with optimizer state), then the history.

    Written in that order, each atomically, so `state.json` always names a
    complete checkpoint and the history of exactly the epochs it holds.
    (Keras' BackupAndRestore writes its files in place and keeps no
    history, so a kill while it writes loses the run; hence this class.)
    """

    def __init__(self, directory, history):
        super().__init__()
        self.directory = Path(directory)
        self.history = history
        self._epoch_start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        record = {"epoch": epoch + 1}
        record.update({k: float(v) for k, v in (logs or {}).items()})
        record["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        record["seconds"] = round(time.perf_counter() - self._epoch_start, 2)
        self.history.append(record)
        checkpoint = self.directory / f"epoch-{epoch + 1:03d}.keras"
        files.save_model(self.model, checkpoint)
        files.write_json(
            self.directory / "state.json",
            {"epoch": epoch + 1, "checkpoint": checkpoint.name, "history": self.history},
        )
        for old in self.directory.glob("epoch-*.keras"):
            if old != checkpoint:
                old.unlink()


def resume_point(directory):
    """`(model, history, epoch)` from the last finished epoch in `directory`, or None."""
    state_path = Path(directory) / "state.json"
    if not state_path.exists():
        return None
    state = files.read_json(state_path)
    model = keras.saving.load_model(Path(directory) / state["checkpoint"])
    return model, state["history"], state["epoch"]


def fit_and_evaluate(model, train, test, settings, checkpoint_dir, callbacks=(), log=print):
    """Trains `model` (or resumes it from `checkpoint_dir`) and returns `(model, history)`.

    Args:
        model: an uncompiled model with its trainable blocks set.
        train, test: `kerasrot.pipeline.Batches`; `test` is evaluated every epoch.
        settings: the stage's hyperparameters (see `kerasrot.recipes`).
        checkpoint_dir: where per-epoch checkpoints live; removed at the end.
        callbacks: extra Keras callbacks (progress reports).
    """
    checkpoint_dir = Path(checkpoint_dir)
    resumed = resume_point(checkpoint_dir)
    if resumed:
        model, history, start = resumed
        log(f"resuming from the checkpoint of epoch {start}/{settings['epochs']} in {checkpoint_dir}")
    else:
        compile_model(model, settings, steps_per_epoch=len(train))
        history, start = [], 0
    if start < settings["epochs"]:
        model.fit(
            train,
            epochs=settings["epochs"],
            initial_epoch=start,
            # The plan of `train` orders the images from (seed, epoch); Keras'
            # default shuffles the batch order with Python's global `random`,
            # which a resumed run cannot repeat (and tf.data would restart).
            shuffle=False,
            validation_data=test,
            callbacks=[EpochSetter(train), EpochCheckpoint(checkpoint_dir, history), *callbacks],
            verbose=settings["verbose"],
        )
    return model, history


def accuracy(model, batches):
    """Top-1 accuracy in percent of `model` on every sample of `batches`."""
    correct = total = 0
    for i in range(len(batches)):
        images, labels = batches[i]
        logits = model.predict_on_batch(images)
        predicted = np.argmax(keras.ops.convert_to_numpy(logits), axis=-1)
        labels = keras.ops.convert_to_numpy(labels)
        correct += int(np.sum(predicted == labels))
        total += len(labels)
    return 100.0 * correct / total


def remove_checkpoints(checkpoint_dir):
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
