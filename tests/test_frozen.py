"""The frozen part of a network, computed once, trains the rest exactly as the whole network would."""

import keras
import numpy as np
import pytest

from kerasrot import frozen, models, training
from kerasrot.pipeline import Batches, EpochSetter
from tests import test_training

SETTINGS = {**test_training.SETTINGS, "learning_rate": 0.05, "epochs": 2, "jit_compile": "off"}


def _last_block_model(arch="resnet18", seed=0):
    keras.utils.set_random_seed(seed)
    model = models.build_model(arch, 10, stem="imagenet", image_size=32)
    return models.set_trainable(model, "last_block")


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_the_two_parts_compute_what_the_model_computes(arch):
    model = _last_block_model(arch)
    frozen_part, trainable_part = frozen.split_at_frozen(model)
    assert all(not layer.trainable for layer in frozen_part.layers)
    assert {layer.name for layer in trainable_part.layers[1:]} == {layer.name for layer in model.layers
                                                                   if layer.trainable}
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(trainable_part(frozen_part(images))),
                               keras.ops.convert_to_numpy(model(images)), rtol=1e-5, atol=1e-5)


def test_a_model_with_nothing_frozen_does_not_split():
    model = models.set_trainable(_last_block_model(), "all")
    with pytest.raises(ValueError, match="no frozen layers"):
        frozen.split_at_frozen(model)


def test_frozen_outputs_are_computed_once_in_order_in_inference_mode():
    model = _last_block_model()
    frozen_part, _ = frozen.split_at_frozen(model)
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), np.arange(10)
    sizes = []
    outputs, got_labels = frozen.frozen_outputs(frozen_part, Batches(images, labels, 4), on_batch=sizes.append)
    assert sizes == [4, 4, 2] and list(got_labels) == list(range(10))
    expected = keras.ops.convert_to_numpy(frozen_part(images.astype("float32"), training=False))
    # float32 round-off: XLA (JAX) sums in another order for a batch of 4 than of 10 (up to 5e-5 seen)
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=2e-4)


def test_training_the_trainable_part_on_frozen_outputs_equals_training_the_whole_model():
    """Same start, same batches in the same order: same losses and the same weights after two epochs."""
    rng = np.random.default_rng(2)
    images, labels = rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 48)
    runs = []
    for on_frozen_outputs in (False, True):
        model = _last_block_model()
        batches = Batches(images, labels, 16, shuffle=True, seed=3, epoch_length=40)
        fitted, data = model, batches
        if on_frozen_outputs:
            frozen_part, fitted = frozen.split_at_frozen(model)
            data = batches.of(frozen.frozen_outputs(frozen_part, Batches(images, labels, 16))[0])
        training.compile_model(fitted, SETTINGS, steps_per_epoch=len(data))
        history = fitted.fit(data, epochs=2, shuffle=False, verbose=0, callbacks=[EpochSetter(data)])
        runs.append((history.history["loss"], [keras.ops.convert_to_numpy(w) for w in model.weights]))
    (losses, weights), (frozen_losses, frozen_weights) = runs
    np.testing.assert_allclose(frozen_losses, losses, rtol=1e-4)
    changed = 0
    for ours, theirs, start in zip(frozen_weights, weights, _last_block_model().weights):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
        changed += not np.allclose(ours, keras.ops.convert_to_numpy(start))
    assert changed > 10  # layer4 and the head moved: the comparison is not of two untrained models
