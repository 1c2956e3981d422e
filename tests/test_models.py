import keras
import numpy as np
import pytest

from kerasrot import models
from kerasrot.runner import files, speed


def trainable_parameters(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("arch,expected", [("resnet18", 11_689_512), ("densenet121", 7_978_856)])
def test_parameter_counts_match_torchvision(arch, expected):
    model = models.build_model(arch, 1000, stem="imagenet", image_size=224)
    assert trainable_parameters(model) == expected


@pytest.mark.parametrize("arch,stem", [("resnet18", "cifar"), ("resnet18", "imagenet"), ("densenet121", "imagenet")])
def test_output_is_logits_per_class(arch, stem):
    model = models.build_model(arch, 4, stem=stem, image_size=32)
    logits = model.predict_on_batch(np.zeros((2, 32, 32, 3), dtype="float32"))
    assert logits.shape == (2, 4)


def test_every_layer_belongs_to_a_named_block():
    model = models.build_model("resnet18", 10, stem="imagenet")
    blocks = {models.block_of(layer.name) for layer in model.layers}
    assert blocks == {"images", *models.BLOCKS}
    summary = []
    model.summary(print_fn=summary.append)
    assert "layer4_block2_conv2" in "\n".join(summary)


def _train_step(model, num_classes=10):
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32"), rng.integers(0, num_classes, 8))


def test_last_block_training_changes_only_layer4_and_head_batchnorm_statistics_included():
    model = models.set_trainable(models.build_model("resnet18", 10, stem="imagenet"), "last_block")
    before = {w.path: keras.ops.convert_to_numpy(w).copy() for w in model.weights}
    _train_step(model)
    for w in model.weights:
        changed = not np.array_equal(before[w.path], keras.ops.convert_to_numpy(w))
        block = models.block_of(w.path.split("/")[0])
        if block in ("layer4", "head") and "normalize" not in w.path:
            if "moving" in w.path or "kernel" in w.path or "gamma" in w.path:
                assert changed, w.path
        elif block in ("stem", "layer1", "layer2", "layer3"):
            assert not changed, w.path


def test_set_trainable_shows_in_trainable_weights():
    model = models.build_model("resnet18", 10, stem="imagenet")
    models.set_trainable(model, "head")
    assert {models.block_of(w.path.split("/")[0]) for w in model.trainable_weights} == {"head"}
    with pytest.raises(ValueError, match="trainable must be one of"):
        models.set_trainable(model, "layer3")


def test_head_swap_keeps_backbone_weights_and_starts_a_new_head():
    rotnet = models.build_model("resnet18", 4, stem="imagenet")
    _train_step(rotnet, num_classes=4)
    classifier = models.build_model("resnet18", 10, stem="imagenet")
    copied = models.transfer_weights(rotnet, classifier)
    assert copied == sum(1 for layer in classifier.layers if layer.weights and models.block_of(layer.name) != "head")
    for layer in classifier.layers:
        if layer.weights and models.block_of(layer.name) != "head":
            for a, b in zip(layer.get_weights(), rotnet.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(a, b)
    assert classifier.get_layer("head_logits").kernel.shape == (512, 10)


@pytest.mark.parametrize(
    "data_format,precision",
    [("channels_first", "float32"), ("channels_first", "mixed_bfloat16"), ("channels_last", "mixed_bfloat16")],
)
def test_weights_of_a_fast_layout_model_give_the_same_logits_in_keras_defaults(data_format, precision):
    # How a stage's model is saved for users: its weights, moved into a model built with Keras' defaults.
    if keras.backend.backend() == "tensorflow" and data_format == "channels_first":
        pytest.skip("TensorFlow's CPU convolutions support channels_last only")
    spec = {"arch": "resnet18", "num_classes": 4, "stem": "imagenet", "image_size": 32}
    fast = models.build_model(**spec, data_format=data_format, dtype=precision)
    fast = speed.with_fast_layers(fast, fused_batchnorm=True, channels_last_kernels=True)
    if precision == "float32":
        _train_step(fast, num_classes=4)  # non-trivial BN statistics (bf16 steps are slow on CPU)
    portable = models.build_model(**spec)
    models.transfer_weights(fast, portable, skip_blocks=())
    assert keras.config.image_data_format() == "channels_last"  # no global state changed
    assert keras.config.dtype_policy().name == "float32"
    for layer in portable.layers:
        if hasattr(layer, "data_format"):
            assert layer.data_format == "channels_last", layer.name
        assert layer.dtype_policy.name == "float32", layer.name
        assert type(layer) is not speed.FusedBatchNormalization
    assert [w.path for w in portable.weights] == [w.path for w in fast.weights]
    for a, b in zip(portable.weights, fast.weights):
        assert a.dtype == "float32"
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), err_msg=a.path)
    batch = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    ours = keras.ops.convert_to_numpy(portable.predict_on_batch(batch)).astype("float32")
    theirs = keras.ops.convert_to_numpy(fast.predict_on_batch(batch)).astype("float32")
    if precision == "float32":
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    else:  # bfloat16 keeps 8 bits of mantissa: agree to a few percent of the logits' scale
        assert np.abs(ours - theirs).max() <= 0.05 * np.abs(theirs).max() + 0.05


def test_keras_file_round_trip_gives_identical_logits(tmp_path):
    model = models.build_model("resnet18", 10, stem="imagenet")
    files.save_model(model, tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    batch = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.predict_on_batch(batch)),
        keras.ops.convert_to_numpy(loaded.predict_on_batch(batch)),
    )
