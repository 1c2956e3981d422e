import json

import keras
import numpy as np
import pytest

from kerasrot import models, training
from kerasrot.pipeline import Batches

# Every setting training.py reads: the other test modules start from these
# and change what they need, so a new setting is added here only.
SETTINGS = {
    "epochs": 4, "learning_rate": 0.05, "schedule": "cosine", "warmup_epochs": 1, "step_epochs": [2],
    "step_gamma": 0.1, "optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-3,
    "global_clipnorm": 0.0, "label_smoothing": 0.0, "pipeline": "memory", "verbose": 0,
    "jit_compile": "on" if keras.backend.backend() == "jax" else "off",  # as runs do: JAX is slow uncompiled
}


def _fresh_stage(settings=SETTINGS):
    """A tiny rotation stage: model (compiled with `settings`), train and test batches, all from seed 0."""
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).integers(0, 255, size=(10, 32, 32, 3)).astype("uint8")
    train = Batches(images, np.zeros(10), 4, rotations=True, augment=True, shuffle=True, seed=1)  # 4+4+2
    test = Batches(images[:4], np.zeros(4), 4, rotations=True)
    model = models.build_model("resnet18", 4, stem="imagenet")
    return training.compile_model(model, settings, steps_per_epoch=len(train)), train, test


class StopAfter(keras.callbacks.Callback):
    """Interrupts training after `epochs` epochs (after their checkpoint is written)."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            raise KeyboardInterrupt


def assert_same_weights(a, b):
    for x, y in zip(a.weights, b.weights):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(x), keras.ops.convert_to_numpy(y), atol=1e-5)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model, train, test = _fresh_stage()
    history = training.train(model, train, test, SETTINGS, tmp_path_factory.mktemp("straight"))
    return model, history


def test_interrupted_stage_resumes_and_ends_like_an_uninterrupted_one(tmp_path, uninterrupted):
    straight, straight_history = uninterrupted
    with pytest.raises(KeyboardInterrupt):
        training.train(*_fresh_stage(), SETTINGS, tmp_path, callbacks=[StopAfter(2)])
    logged = []
    model, train, test = _fresh_stage()
    history = training.train(model, train, test, SETTINGS, tmp_path, log=logged.append)

    assert logged == ["resuming from the checkpoint of epoch 2/4"]
    assert [record["epoch"] for record in history] == [1, 2, 3, 4]
    assert_same_weights(straight, model)
    assert history[-1]["loss"] == pytest.approx(straight_history[-1]["loss"], rel=1e-4)
    assert history[-1]["learning_rate"] == pytest.approx(straight_history[-1]["learning_rate"])


def test_kill_between_history_row_and_checkpoint_repeats_the_epoch_and_logs_it_once(
        tmp_path, monkeypatch, uninterrupted):
    # CSVLogger writes epoch 2's row, then the run dies before BackupAndRestore
    # saves epoch 2: the resumed run trains epoch 2 again, the CSV holds it
    # twice, and read_history keeps the later row.
    class DiesBeforeSavingEpoch2(keras.callbacks.BackupAndRestore):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt
            super().on_epoch_end(epoch, logs)

    with monkeypatch.context() as patch:
        patch.setattr(keras.callbacks, "BackupAndRestore", DiesBeforeSavingEpoch2)
        with pytest.raises(KeyboardInterrupt):
            training.train(*_fresh_stage(), SETTINGS, tmp_path)
    assert json.loads((tmp_path / "training_metadata.json").read_text())["epoch"] == 1
    model, train, test = _fresh_stage()
    history = training.train(model, train, test, SETTINGS, tmp_path)

    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1", "1", "2", "3"]
    assert [record["epoch"] for record in history] == [1, 2, 3, 4]
    assert_same_weights(uninterrupted[0], model)


class PoisonAtEpoch(keras.callbacks.Callback):
    """Makes a weight NaN at the start of epoch `epoch` (from 1): the next loss is NaN."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            kernel = self.model.get_layer("head_logits").kernel
            kernel.assign(keras.ops.full(kernel.shape, float("nan")))


def test_diverging_loss_stops_naming_the_epoch_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(training.Diverged, match="the loss became nan in epoch 3 \\(batch 1\\)") as stopped:
        training.train(*_fresh_stage(), SETTINGS, tmp_path, callbacks=[PoisonAtEpoch(3)])
    assert stopped.value.epoch == 3
    assert json.loads((tmp_path / "training_metadata.json").read_text())["epoch"] == 2
    model = _fresh_stage()[0]
    training.compile_model(model, SETTINGS, 3)
    model.optimizer.build(model.trainable_variables)
    model.load_weights(tmp_path / "latest.weights.h5")
    assert all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in model.weights)
    assert [r["epoch"] for r in training.read_history(tmp_path / "history.csv")] == [1, 2]


class PoisonAfterLastBatchOf(keras.callbacks.Callback):
    """Makes a weight NaN after the last update of epoch `epoch`: every training loss of it stays finite."""

    def __init__(self, epoch, batches):
        super().__init__()
        self.epoch, self.batches, self.current = epoch, batches, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch == self.batches - 1:
            kernel = self.model.get_layer("head_logits").kernel
            kernel.assign(keras.ops.full(kernel.shape, float("nan")))


def test_weights_that_the_last_update_of_an_epoch_breaks_stop_the_stage_at_that_epoch(tmp_path):
    model, train, test = _fresh_stage()
    with pytest.raises(training.Diverged, match="the test loss became nan after epoch 2"):
        training.train(model, train, test, SETTINGS, tmp_path, callbacks=[PoisonAfterLastBatchOf(2, len(train))])
    assert json.loads((tmp_path / "training_metadata.json").read_text())["epoch"] == 1


def test_keras_terminate_on_nan_default_would_checkpoint_the_diverged_weights(tmp_path):
    # Why StopOnDivergence raises: TerminateOnNaN's default stops gracefully,
    # the epoch ends, and BackupAndRestore saves NaN weights over the good ones.
    model, train, _ = _fresh_stage()
    training.compile_model(model, SETTINGS, len(train))
    model.fit(train, epochs=4, verbose=0, callbacks=[
        PoisonAtEpoch(3), keras.callbacks.TerminateOnNaN(),
        keras.callbacks.BackupAndRestore(str(tmp_path), delete_checkpoint=False),
    ])
    assert json.loads((tmp_path / "training_metadata.json").read_text())["epoch"] == 3
    model.load_weights(tmp_path / "latest.weights.h5")
    assert not np.isfinite(keras.ops.convert_to_numpy(model.get_layer("head_logits").kernel)).all()


@pytest.mark.parametrize("optimizer", training.OPTIMIZERS)
@pytest.mark.parametrize("schedule", training.SCHEDULES)
def test_every_optimizer_and_schedule_builds_and_steps(optimizer, schedule):
    settings = {**SETTINGS, "optimizer": optimizer, "schedule": schedule}
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)])  # the optimizer is the point
    training.compile_model(model, settings, steps_per_epoch=3)
    lr = training.learning_rate_schedule(settings, 3)
    if schedule != "constant":
        assert float(lr(0)) != pytest.approx(float(lr(11)))
    before = keras.ops.convert_to_numpy(model.weights[0]).copy()
    model.train_on_batch(np.eye(4, dtype="float32"), np.arange(4))
    assert not np.array_equal(before, keras.ops.convert_to_numpy(model.weights[0]))


def test_global_clipnorm_bounds_each_update_and_zero_leaves_it():
    settings = {**SETTINGS, "schedule": "constant", "learning_rate": 1.0, "momentum": 0.0, "nesterov": False,
                "weight_decay": 0.0}
    x, y = np.full((4, 4), 100.0, dtype="float32"), np.arange(4)  # large inputs: a large gradient
    steps = {}
    for clip in (0.0, 0.5):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)])
        training.compile_model(model, {**settings, "global_clipnorm": clip}, steps_per_epoch=1)
        before = [keras.ops.convert_to_numpy(w).copy() for w in model.weights]
        model.train_on_batch(x, y)
        after = [keras.ops.convert_to_numpy(w) for w in model.weights]
        steps[clip] = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(after, before)))
    assert steps[0.0] > 10  # unclipped, the step is the whole gradient
    assert steps[0.5] == pytest.approx(0.5, rel=1e-4)  # learning rate 1 x the clipped norm


def test_schedules_follow_their_definition():
    settings = {**SETTINGS, "learning_rate": 0.1, "epochs": 4, "step_epochs": [2, 3], "step_gamma": 0.5}
    step = training.learning_rate_schedule({**settings, "schedule": "step"}, steps_per_epoch=10)
    assert [round(float(step(i)), 6) for i in (0, 19, 21, 31)] == [0.1, 0.1, 0.05, 0.025]
    cosine = training.learning_rate_schedule({**settings, "schedule": "cosine", "warmup_epochs": 1}, 10)
    assert float(cosine(0)) == pytest.approx(0.01)  # warm-up starts at a tenth
    assert float(cosine(10)) == pytest.approx(0.1)  # peak after warm-up
    assert float(cosine(40)) == pytest.approx(0.0, abs=1e-6)  # and decays to zero
    assert training.learning_rate_schedule({**settings, "schedule": "constant"}, 10) == 0.1


def test_label_smoothing_matches_the_one_hot_definition_and_saves(tmp_path):
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], dtype="float32")
    labels = np.array([1, 2])
    smoothing = 0.2
    targets = np.eye(3)[labels] * (1 - smoothing) + smoothing / 3
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = float(np.mean(-(targets * log_probs).sum(-1)))
    loss = training.make_loss({"label_smoothing": smoothing})
    assert isinstance(loss, training.SmoothedSparseCrossentropy)
    assert float(loss(labels, logits)) == pytest.approx(expected, rel=1e-5)
    assert isinstance(training.make_loss({"label_smoothing": 0.0}), keras.losses.SparseCategoricalCrossentropy)

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    training.compile_model(model, {**SETTINGS, "label_smoothing": smoothing, "schedule": "constant"}, 1)
    model.train_on_batch(np.eye(4, dtype="float32")[:2], labels)
    model.save(tmp_path / "smoothed.keras")
    loaded = keras.saving.load_model(tmp_path / "smoothed.keras")
    assert loaded.loss.label_smoothing == smoothing


def test_warmup_cosine_gives_keras_cosine_decay_rates_without_cond():
    """`WarmupCosineDecay` (branch-free, for CUDA graphs) is Keras' CosineDecay with warm-up, step for step."""
    ours = training.WarmupCosineDecay(0.01, decay_steps=30, warmup_target=0.1, warmup_steps=10)
    keras_own = keras.optimizers.schedules.CosineDecay(0.01, decay_steps=30, warmup_target=0.1, warmup_steps=10)
    for step in range(0, 45):
        assert float(ours(step)) == pytest.approx(float(keras_own(step)), rel=1e-6, abs=1e-9)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(ours))
    assert isinstance(restored, training.WarmupCosineDecay) and float(restored(12)) == float(ours(12))
