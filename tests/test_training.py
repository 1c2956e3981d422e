import keras
import numpy as np
import pytest

from kerasrot import backend, models, training
from kerasrot.pipeline import Batches

SETTINGS = {
    "epochs": 4, "learning_rate": 0.05, "schedule": "cosine", "warmup_epochs": 1, "step_epochs": [2],
    "step_gamma": 0.1, "optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-3,
    "label_smoothing": 0.0, "jit_compile": "off", "verbose": 0,
}


def _fresh_stage():
    """A tiny rotation stage: model, train and test batches, all from seed 0."""
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).integers(0, 255, size=(10, 32, 32, 3)).astype("uint8")
    train = Batches(images, np.zeros(10), 4, rotations=True, augment=True, shuffle=True, seed=1)  # 4+4+2
    test = Batches(images[:4], np.zeros(4), 4, rotations=True)
    with backend.layout("channels_last", "float32"):
        model = models.build_model("resnet18", 4, stem="imagenet")
    return model, train, test


class StopAfter(keras.callbacks.Callback):
    """Interrupts training after `epochs` epochs (after their checkpoint is written)."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            raise KeyboardInterrupt


def test_interrupted_stage_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    straight, straight_history = training.fit_and_evaluate(*_fresh_stage(), SETTINGS, tmp_path / "a")

    with pytest.raises(KeyboardInterrupt):
        training.fit_and_evaluate(*_fresh_stage(), SETTINGS, tmp_path / "b", callbacks=[StopAfter(2)])
    logged = []
    resumed, history = training.fit_and_evaluate(*_fresh_stage(), SETTINGS, tmp_path / "b", log=logged.append)

    assert any("resuming from the checkpoint of epoch 2/4" in line for line in logged)
    assert [record["epoch"] for record in history] == [1, 2, 3, 4]
    for a, b in zip(straight.weights, resumed.weights):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), atol=1e-5)
    assert history[-1]["loss"] == pytest.approx(straight_history[-1]["loss"], rel=1e-4)


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


def test_label_smoothing_loss_takes_integer_labels():
    loss = training.SmoothedSparseCrossentropy(0.1)
    logits = np.array([[10.0, 0.0, 0.0]], dtype="float32")
    smoothed = float(loss(np.array([0]), logits))
    plain = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(np.array([0]), logits))
    assert smoothed > plain > 0


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
