import keras
import numpy as np
import pytest

from kerasrot import backend, models, training
from kerasrot.pipeline import Batches

SETTINGS = {
    "epochs": 4, "learning_rate": 0.05, "schedule": "cosine", "warmup_epochs": 1, "step_epochs": [2],
    "step_gamma": 0.1, "optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-3,
    "label_smoothing": 0.0, "jit_compile": False, "verbose": 0,
}


def _fresh_stage():
    """A tiny rotation stage: model, train and test batches, all from seed 0."""
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).integers(0, 255, size=(24, 32, 32, 3)).astype("uint8")
    train = Batches(images, np.zeros(24), 8, rotations=True, augment=True, shuffle=True, seed=1)
    test = Batches(images[:8], np.zeros(8), 8, rotations=True)
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
    model = models.build_model("resnet18", 4, stem="imagenet")
    training.compile_model(model, settings, steps_per_epoch=3)
    lr = training.learning_rate_schedule(settings, 3)
    if schedule != "constant":
        assert float(lr(0)) != pytest.approx(float(lr(11)))
    model.train_on_batch(np.zeros((4, 32, 32, 3), "float32"), np.arange(4))


def test_label_smoothing_loss_takes_integer_labels():
    loss = training.SmoothedSparseCrossentropy(0.1)
    logits = np.array([[10.0, 0.0, 0.0]], dtype="float32")
    smoothed = float(loss(np.array([0]), logits))
    plain = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(np.array([0]), logits))
    assert smoothed > plain > 0
