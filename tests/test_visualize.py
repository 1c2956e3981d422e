"""Attention maps and first-layer filters: the right numbers, in inference mode, drawn into PNG figures."""

import keras
import numpy as np
import pytest
from keras import layers

from kerasrot import models, visualize

DATA_FORMATS = ["channels_last", "channels_first"]


def skip_channels_first_on_tensorflow(data_format):
    if keras.backend.backend() == "tensorflow" and data_format == "channels_first":
        pytest.skip("TensorFlow's CPU convolutions support channels_last only")


def tiny_model(data_format, seed=0):
    """An 8x8 network named by block like kerasrot's, with BatchNorm statistics far from the initial ones.

    layer2 ends in BatchNorm (no ReLU), so its outputs have both signs and the |.| matters.
    """
    keras.utils.set_random_seed(seed)
    conv = lambda filters, strides, name: layers.Conv2D(  # noqa: E731
        filters, 3, strides=strides, padding="same", data_format=data_format, name=name)
    bn = lambda name: layers.BatchNormalization(axis=models.channel_axis(data_format), name=name)  # noqa: E731
    inputs = keras.Input((8, 8, 3), name="images")
    x = layers.Rescaling(1 / 255, name="preprocess_scale")(inputs)
    if data_format == "channels_first":
        x = layers.Permute((3, 1, 2), name="preprocess_to_channels_first")(x)
    x = layers.ReLU(name="stem_relu")(conv(4, 1, "stem_conv")(x))
    x = layers.ReLU(name="layer1_relu")(bn("layer1_bn")(conv(6, 2, "layer1_conv")(x)))
    x = bn("layer2_bn")(conv(5, 1, "layer2_conv")(x))
    x = layers.ReLU(name="layer3_relu")(conv(3, 2, "layer3_conv")(x))
    x = layers.GlobalAveragePooling2D(data_format=data_format, name="head_pool")(x)
    model = keras.Model(inputs, layers.Dense(4, name="head_logits")(x))
    rng = np.random.default_rng(seed)
    for name in ("layer1_bn", "layer2_bn"):
        size = model.get_layer(name).gamma.shape[0]
        model.get_layer(name).set_weights([rng.uniform(0.5, 2, size), rng.normal(0, 1, size),
                                           rng.normal(0, 1, size), rng.uniform(0.1, 3, size)])
    return model


def random_images(count, size=8, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3)).astype("uint8")


@pytest.mark.parametrize("data_format", DATA_FORMATS)
def test_attention_map_is_the_sum_over_channels_of_abs_block_output_to_the_power_p(data_format):
    skip_channels_first_on_tensorflow(data_format)
    model = tiny_model(data_format)
    assert models.data_format_of(model) == data_format
    images = random_images(5)
    maps = visualize.attention_maps(model, images, batch_size=2)  # batches of 2, 2 and 1
    axis = 1 if data_format == "channels_first" else -1
    expected_sizes = {"stem": 8, "layer1": 4, "layer2": 4, "layer3": 2}
    for block, p in visualize.ATTENTION_POWERS.items():
        last_layer = {"stem": "stem_relu", "layer1": "layer1_relu", "layer2": "layer2_bn", "layer3": "layer3_relu"}
        output = keras.Model(model.input, model.get_layer(last_layer[block]).output).predict(images, verbose=0)
        expected = np.sum(np.abs(output) ** p, axis=axis)
        assert maps[block].shape == (5, expected_sizes[block], expected_sizes[block])
        assert maps[block].dtype == np.float32
        np.testing.assert_allclose(maps[block], expected, rtol=1e-4, atol=1e-6, err_msg=block)


def test_attention_maps_use_batchnorm_moving_statistics_not_the_batchs():
    model = tiny_model("channels_last")
    images = random_images(6)
    together = visualize.attention_maps(model, images, batch_size=6)
    alone = visualize.attention_maps(model, images[:1], batch_size=1)
    for block in visualize.ATTENTION_POWERS:
        np.testing.assert_allclose(alone[block][0], together[block][0], rtol=1e-4, atol=1e-6, err_msg=block)


def test_upsampled_maps_have_the_image_size_and_lie_in_zero_to_one():
    maps = np.random.default_rng(0).uniform(0, 50, (3, 4, 4)).astype("float32")
    maps[2] = 7.0  # a constant map has nothing to show
    shown = visualize.upsampled(maps, 32)
    assert shown.shape == (3, 32, 32)
    assert shown[:2].min() == 0 and shown[:2].max() == pytest.approx(1)
    assert np.all(shown[2] == 0)


@pytest.mark.parametrize("stem,size", [("imagenet", 7), ("cifar", 3)])
def test_first_layer_filters_are_the_stem_kernels_each_spanning_zero_to_one(stem, size):
    model = models.resnet18(4, stem=stem)
    filters = visualize.first_layer_filters(model)
    assert filters.shape == (64, size, size, 3)
    np.testing.assert_allclose(filters.min(axis=(1, 2, 3)), 0, atol=1e-6)
    np.testing.assert_allclose(filters.max(axis=(1, 2, 3)), 1, atol=1e-6)
    kernel = keras.ops.convert_to_numpy(model.get_layer("stem_conv").kernel)[..., 5]  # filter 5, (k, k, 3)
    np.testing.assert_allclose(filters[5], (kernel - kernel.min()) / (kernel.max() - kernel.min()), atol=1e-5)


def is_png(path):
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_attention_draws_a_figure_that_saves_to_png(tmp_path):
    formats = ["channels_last"] if keras.backend.backend() == "tensorflow" else DATA_FORMATS
    nets = {f"net{i}": tiny_model(f, seed=i) for i, f in enumerate(formats)}
    fig = visualize.plot_attention(nets, random_images(4), labels=[0, 1, 2, 3], class_names=list("abcd"))
    # 4 images in 2 side-by-side groups: 2 rows per model, 2 x (image + 4 blocks) columns
    assert len(fig.axes) == 2 * len(nets) * 10
    fig.savefig(tmp_path / "attention.png")
    assert is_png(tmp_path / "attention.png")


def test_plot_filters_draws_a_figure_that_saves_to_png(tmp_path):
    fig = visualize.plot_filters({"imagenet stem": models.resnet18(4, stem="imagenet"),
                                  "cifar stem": models.resnet18(4, stem="cifar")})
    assert len(fig.axes) == 2
    # 8 x 8 kernels of 21 x 21 pixels with 1-pixel gaps between
    assert fig.axes[0].images[0].get_array().shape == (8 * 22 - 1, 8 * 22 - 1, 3)
    fig.savefig(tmp_path / "filters.png")
    assert is_png(tmp_path / "filters.png")


def test_pick_images_gives_one_image_of_each_of_the_first_classes_the_same_for_a_seed():
    labels = np.random.default_rng(0).integers(0, 10, 200)
    picked = visualize.pick_images(labels, count=8, seed=0)
    assert labels[picked].tolist() == list(range(8))
    assert picked.tolist() == visualize.pick_images(labels, count=8, seed=0).tolist()
    with pytest.raises(ValueError, match="8 images of different classes"):
        visualize.pick_images(labels % 3, count=8)
