"""Every speed-up leaves the training results unchanged (within float tolerance).

The fast settings (`kerasrot.runner.speed`: channels_first, fused BatchNorm,
channels_last kernels, mixed bfloat16) change *how* a step is computed, never *what*: the same model from the same weights, trained on the
same batches, follows the same loss trajectory and ends with the same
BatchNorm statistics as Keras' defaults (channels_last, float32, stock layers).
"""

import keras
import numpy as np
import pytest

from kerasrot import models, training
from kerasrot.runner import speed
from tests import test_training

SPEC = {"arch": "resnet18", "num_classes": 4, "stem": "imagenet", "image_size": 32}
SETTINGS = {**test_training.SETTINGS, "learning_rate": 2e-4, "schedule": "constant", "epochs": 1, "jit_compile": "off"}
STEPS = 5


def _trajectory(data_format, precision, fast_layers, start_weights):
    """Losses of STEPS training steps on one batch from `start_weights`, and the final moving statistics."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (32, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 4, 32)
    model = models.build_model(**SPEC, data_format=data_format, dtype=precision)
    model = speed.with_fast_layers(model, **{name: True for name in fast_layers})
    model.set_weights(start_weights)
    training.compile_model(model, SETTINGS, steps_per_epoch=STEPS)
    losses = []
    for _ in range(STEPS):
        losses.append(float(model.train_on_batch(images, labels, return_dict=True)["loss"]))
    moving = [keras.ops.convert_to_numpy(w) for w in model.weights if "moving" in w.path]
    return np.array(losses), moving


@pytest.fixture(scope="module")
def trajectory():
    """`trajectory(data_format, precision, fast_layers)`, each computed once, all from one start."""
    keras.utils.set_random_seed(0)
    start_weights = models.build_model(**SPEC).get_weights()
    seen = {}

    def run(*config):
        if config not in seen:
            seen[config] = _trajectory(*config, start_weights)
        return seen[config]

    return run


KERAS_DEFAULTS = ("channels_last", "float32", ())
FUSED = ("fused_batchnorm",)
TORCH_CPU = ("fused_batchnorm", "channels_last_kernels")  # what "auto" picks on torch without a GPU


@pytest.mark.parametrize(
    "fast",
    [("channels_first", "float32", ()), ("channels_last", "float32", FUSED), ("channels_first", "float32", FUSED),
     ("channels_first", "float32", ("channels_last_kernels",)), ("channels_first", "float32", TORCH_CPU)],
    ids=["channels_first", "fused_batchnorm", "channels_first+fused_batchnorm", "channels_last_kernels",
         "channels_first+fused_batchnorm+channels_last_kernels"],
)
def test_fast_float32_settings_follow_keras_defaults(trajectory, fast):
    if keras.backend.backend() == "tensorflow" and fast[0] == "channels_first":
        pytest.skip("TensorFlow's CPU convolutions support channels_last only")
    if keras.backend.backend() != "torch" and fast[2]:
        pytest.skip("fused BatchNorm and channels_last kernels are PyTorch-backend speed-ups")
    losses, moving = trajectory(*KERAS_DEFAULTS)
    fast_losses, fast_moving = trajectory(*fast)
    assert losses[-1] < 0.5 * losses[0]  # it learns: the comparison is not between two constants
    np.testing.assert_allclose(fast_losses, losses, rtol=1e-3, atol=1e-3 * losses[0])
    for ours, theirs in zip(fast_moving, moving):
        np.testing.assert_allclose(ours, theirs, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("fast_layers", [(), TORCH_CPU], ids=["stock", "fast"])
def test_mixed_bfloat16_follows_float32_within_its_precision(trajectory, fast_layers):
    """bfloat16 keeps 8 bits of mantissa: a few percent, with Keras' BatchNorm as with the fused one."""
    if keras.backend.backend() == "tensorflow":
        pytest.skip("TensorFlow's CPU convolutions support channels_last only")
    if keras.backend.backend() != "torch" and fast_layers:
        pytest.skip("fused BatchNorm and channels_last kernels are PyTorch-backend speed-ups")
    losses, moving = trajectory(*KERAS_DEFAULTS)
    fast_losses, fast_moving = trajectory("channels_first", "mixed_bfloat16", fast_layers)
    np.testing.assert_allclose(fast_losses, losses, rtol=0.1, atol=0.05 * losses[0])
    for ours, theirs in zip(fast_moving, moving):
        np.testing.assert_allclose(ours, theirs, rtol=0.1, atol=0.1)


def test_fast_copy_swaps_only_the_batchnorm_conv_and_folded_padding_layers_and_keeps_the_weights():
    model = models.build_model(**SPEC, data_format="channels_first")
    fused = speed.with_fast_layers(model, fused_batchnorm=True, channels_last_kernels=True)
    fast_classes = (speed.FusedBatchNormalization, speed.ChannelsLastKernelConv2D, speed.PaddedMaxPooling2D)
    swapped = [layer.name for layer in fused.layers if type(layer) in fast_classes]
    assert swapped == [layer.name for layer in model.layers if isinstance(
        layer, (keras.layers.BatchNormalization, keras.layers.Conv2D, keras.layers.MaxPooling2D))]
    # The padding before each strided 3x3 or 7x7 convolution moved into it, and the stem's into its max-pool.
    folded = {layer.name: layer.implicit_padding for layer in fused.layers if getattr(layer, "implicit_padding", 0)}
    assert folded == {"stem_conv": 3, "stem_pool": 1, "layer2_block1_conv1": 1, "layer3_block1_conv1": 1,
                      "layer4_block1_conv1": 1}
    assert all(type(fused.get_layer(f"{name}_pad")) is keras.layers.Identity for name in folded)
    untouched = [name for name in (layer.name for layer in model.layers) if name not in swapped
                 and name.removesuffix("_pad") not in folded]
    assert [type(fused.get_layer(name)) for name in untouched] == [type(model.get_layer(name)) for name in untouched]
    for a, b in zip(fused.weights, model.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_implicit_padding_convolves_as_zero_padding_then_a_valid_convolution(data_format):
    """Forward and backward; on torch NCHW without PyTorch's pad op (a copy of the activations each way)."""
    if keras.backend.backend() == "tensorflow" and data_format == "channels_first":
        pytest.skip("TensorFlow's CPU convolutions support channels_last only")
    shape = (2, 8, 9, 9) if data_format == "channels_first" else (2, 9, 9, 8)
    x = keras.ops.convert_to_tensor(np.random.default_rng(0).normal(size=shape).astype("float32"))
    common = dict(filters=6, kernel_size=3, strides=2, padding="valid", use_bias=False, data_format=data_format)
    stock = keras.Sequential([keras.layers.ZeroPadding2D(1, data_format=data_format), keras.layers.Conv2D(**common)])
    folded = speed.ChannelsLastKernelConv2D(**common, implicit_padding=1)
    stock.build(shape)
    folded.build(shape)
    folded.kernel.assign(stock.layers[1].kernel)
    assert folded.compute_output_shape(shape) == stock.compute_output_shape(shape)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(folded(x)), keras.ops.convert_to_numpy(stock(x)),
                               rtol=1e-5, atol=1e-5)
    if keras.backend.backend() != "torch":
        return
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    grads = []
    for layer in (stock, folded):
        inputs = x.detach().requires_grad_(True)
        with Ops() as ops:
            layer(inputs).square().sum().backward()
        grads.append(inputs.grad.numpy())
        pads = [name for name in ops.names if "pad" in name]
        if layer is folded and data_format == "channels_first":
            assert pads == []
        elif layer is stock:
            assert pads  # the count is not vacuous: the stock pair pads
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a PyTorch-backend convolution")
@pytest.mark.parametrize("size, kernel, strides, padding, implicit, dense", [
    (1, 3, 1, "same", 0, True),  # layer4 at 32x32 with the ImageNet stem: the centre tap alone
    (2, 3, 2, "valid", 1, True),  # its first convolution: one window on a 2x2 map
    (2, 3, 1, "same", 0, True),  # layer3: each of 4 windows spans the 2x2 map
    (2, 5, 1, "same", 0, True),
    (1, 7, 2, "valid", 3, True),
    (3, 4, 2, "same", 0, False),  # asymmetric "same" padding, windows that miss a row: conv2d
    (4, 3, 1, "same", 0, False),
    (5, 3, 2, "valid", 1, False),
])
def test_convolutions_as_matrix_products_compute_what_conv2d_computes(size, kernel, strides, padding, implicit,
                                                                       dense):
    """Outputs and both gradients, alike to float tolerance, and the same bits from run to run."""
    import torch

    shape = (3, 6, size, size)
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    common = dict(filters=4, kernel_size=kernel, strides=strides, padding=padding, use_bias=False,
                  data_format="channels_first")
    stock = keras.layers.Conv2D(**common)
    fast = speed.ChannelsLastKernelConv2D(**common, implicit_padding=implicit)
    stock.build((3, 6, size + 2 * implicit, size + 2 * implicit))
    fast.build(shape)
    fast.kernel.assign(stock.kernel)
    padded = np.pad(x, [(0, 0), (0, 0), (implicit, implicit), (implicit, implicit)])
    results = []
    for layer, inputs in ((stock, padded), (fast, x), (fast, x)):
        inputs = torch.tensor(inputs, requires_grad=True)
        layer.kernel.value.grad = None
        outputs = layer(inputs)
        (outputs * torch.linspace(-1, 1, outputs.numel()).reshape(outputs.shape)).sum().backward()
        grad_x = inputs.grad.numpy()
        if layer is stock:  # its input was padded by hand
            grad_x = grad_x[:, :, implicit:implicit + size, implicit:implicit + size]
        results.append((outputs.detach().numpy(), grad_x, layer.kernel.value.grad.numpy().copy()))
    (stock_results, fast_results, again) = results
    for ours, theirs, repeated in zip(fast_results, stock_results, again):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ours, repeated)
    before, after = (implicit, implicit) if implicit else speed.padding_of(padding, size, kernel, strides)
    assert (speed.windows_over_the_whole_input(size, kernel, strides, before, after) is not None) == dense


def test_a_max_pool_takes_in_its_zero_padding_only_after_a_relu():
    """PyTorch pads a max-pool with minus infinity: the same maxima as zeros only where no input is negative."""
    if keras.backend.backend() == "tensorflow":
        pytest.skip("TensorFlow's CPU pooling supports channels_last only")
    inputs = keras.Input((4, 9, 9))
    relu = keras.layers.ReLU(name="relu")(inputs)
    pooled = keras.layers.MaxPooling2D(3, 2, data_format="channels_first", name="pool")(
        keras.layers.ZeroPadding2D(1, data_format="channels_first", name="pool_pad")(relu))
    raw = keras.layers.MaxPooling2D(3, 2, data_format="channels_first", name="raw")(
        keras.layers.ZeroPadding2D(1, data_format="channels_first", name="raw_pad")(inputs))
    model = keras.Model(inputs, [pooled, raw])
    fast = speed.with_fast_layers(model, channels_last_kernels=True)
    assert type(fast.get_layer("pool")) is speed.PaddedMaxPooling2D
    assert type(fast.get_layer("raw")) is keras.layers.MaxPooling2D  # negative inputs: the zeros matter
    x = np.random.default_rng(0).normal(size=(2, 4, 9, 9)).astype("float32")
    for ours, theirs in zip(fast(x), model(x)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs))


def _momentum_run(lay_out_slots):
    """Five SGD steps of the out-major-kernel network; its losses, weights and (variable, slot) pairs."""
    keras.utils.set_random_seed(0)
    model = models.build_model(**SPEC, data_format="channels_first")
    model = speed.with_fast_layers(model, fused_batchnorm=True, channels_last_kernels=True)
    training.compile_model(model, {**SETTINGS, "learning_rate": 0.01}, steps_per_epoch=STEPS)
    if lay_out_slots:
        speed.lay_out_slots_like_variables(model.optimizer)
    rng = np.random.default_rng(0)
    images, labels = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32"), rng.integers(0, 4, 8)
    losses = [float(model.train_on_batch(images, labels, return_dict=True)["loss"]) for _ in range(STEPS)]
    optimizer = model.optimizer
    pairs = [(v, optimizer.momentums[optimizer._get_variable_index(v)]) for v in model.trainable_variables]
    return losses, [keras.ops.convert_to_numpy(w) for w in model.weights], pairs


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a PyTorch memory layout")
def test_momentum_slots_take_the_out_major_kernel_layout_and_the_updates_stay_the_same():
    """Unlike strides send PyTorch's `_foreach_add_` down a slow path; laid out alike, the numbers are equal."""
    losses, weights, pairs = _momentum_run(lay_out_slots=False)
    laid_losses, laid_weights, laid_pairs = _momentum_run(lay_out_slots=True)
    kernels = [(v, slot) for v, slot in laid_pairs if len(v.shape) == 4]
    assert kernels and all(not v.value.is_contiguous() for v, _ in kernels)  # out-major, not Keras' layout
    assert all(slot.value.stride() == v.value.stride() for v, slot in laid_pairs)
    assert any(slot.value.stride() != v.value.stride() for v, slot in pairs)  # what Keras alone does
    np.testing.assert_allclose(laid_losses, losses, rtol=1e-6)
    for ours, theirs in zip(laid_weights, weights):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # A restored checkpoint assigns into the slot: the layout stays.
    v, slot = kernels[0]
    stride = slot.value.stride()
    slot.assign(np.ones(slot.shape, "float32"))
    assert slot.value.stride() == stride and float(keras.ops.sum(slot.value)) == np.prod(slot.shape)
