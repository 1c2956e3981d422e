"""Speed: the backend- and device-specific choices that make training fast.

They change how a stage computes, never what (tests/test_speedups.py), and
each is a setting whose "auto" this module turns into a choice:

* `data_format`: the PyTorch backend convolves NCHW; with Keras' default
  NHWC (`channels_last`) every convolution transposes and copies its input
  and kernel (about 15% of a CPU training step). With `channels_first` the
  network works in NCHW from its first layer. JAX and TensorFlow prefer
  NHWC, and TensorFlow's CPU kernels support nothing else.
* `precision`: `mixed_bfloat16` computes in bfloat16 with float32 weights.
  It pays where the hardware does bfloat16 natively (recent NVIDIA GPUs,
  CPUs with AVX512-BF16 or AMX under PyTorch), and costs elsewhere.
* `fused_batchnorm`: Keras builds BatchNormalization from elementwise ops,
  each a pass over the activations forward and again backward. On the
  PyTorch backend that is about 40% of a CPU training step;
  `FusedBatchNormalization` calls PyTorch's fused kernel instead, with
  Keras' semantics. Elsewhere XLA fuses those ops itself.
* `channels_last_kernels`: Keras stores a convolution kernel as (height,
  width, in, out) and the PyTorch backend hands `conv2d` a permuted view
  of it, a memory layout oneDNN has no fast path for; its backward pass is
  most of a CPU training step. `ChannelsLastKernelConv2D` hands it the
  kernel in PyTorch's channels_last memory format instead, the layout the
  activations already have (the network's first `Permute` is a view).
  On a GPU it saves more: cuDNN copies a permuted kernel into its own
  layout forward and backward (39 copies per ResNet18 step), and the
  gradient, laid out unlike its variable, is copied again (20 more). Its
  optimiser slots must share the layout (`lay_out_slots_like_variables`),
  or PyTorch's multi-tensor update falls back to a slow path for each.
  The same layer pads inside `conv2d` where the model has a `ZeroPadding2D`
  before a strided convolution (a copy of the activations each way), and
  the stem's max-pool pads inside `max_pool2d` (`PaddedMaxPooling2D`).
  Where every window of a convolution spans its whole input (ResNet18's
  layer3 and layer4 at 32x32 with the ImageNet stem see 2x2 and 1x1 maps)
  it is one matrix product of the taps that meet real pixels
  (`as_matrix_product`): on a 1x1 map `conv2d` multiplies 8 of a 3x3
  kernel's 9 taps by padding. With these two, the quick rotation stage
  trained 2.4x faster on 2 AVX2-only cores in float32 (results/backends.md,
  "A quick preset for a small CPU").
* `jit_compile`: on for JAX, which runs op by op uncompiled.
* `cuda_graphs`: on a CUDA GPU under torch, the train and test steps are
  recorded once and replayed (`kerasrot.runner.cuda_graphs`): Keras'
  Python per layer costs about four times the GPU work of a ResNet18 step.

TensorFlow's oneDNN kernels are a sixth choice, made in
`kerasrot/__init__.py` because TensorFlow reads it when it is imported.
Models are built in the chosen layout by passing `data_format` and `dtype`
to the builders; the model saved for users is always NHWC float32 with
stock layers (`kerasrot.runner.stages`), so it loads everywhere.
"""

import functools
import math

import keras

from kerasrot.runner import device

DATA_FORMATS = ("auto", "channels_last", "channels_first")
PRECISIONS = ("auto", "float32", "mixed_bfloat16")
ON_OFF = ("auto", "on", "off")
JIT_COMPILE = ON_OFF


def resolve(settings):
    """Turns the "auto" speed settings into concrete choices for this backend and device (in place).

    Probe stages have only `jit_compile`: they train small heads on cached features.
    """
    backend = keras.backend.backend()
    if settings.get("data_format") == "auto":
        settings["data_format"] = "channels_first" if backend == "torch" else "channels_last"
    if settings.get("precision") == "auto":
        native = device.has_gpu() or (backend == "torch" and device.cpu_has_native_bfloat16())
        settings["precision"] = "mixed_bfloat16" if native else "float32"
    if "fused_batchnorm" in settings and (settings["fused_batchnorm"] == "auto" or backend != "torch"):
        settings["fused_batchnorm"] = "on" if backend == "torch" else "off"
    if "channels_last_kernels" in settings:
        fits = backend == "torch" and settings["data_format"] == "channels_first"
        if settings["channels_last_kernels"] == "auto":
            settings["channels_last_kernels"] = "on" if fits else "off"
        elif not fits:
            settings["channels_last_kernels"] = "off"
    if "cuda_graphs" in settings:  # only where there is CUDA to record
        graphs = backend == "torch" and device.has_gpu()
        settings["cuda_graphs"] = "on" if graphs and settings["cuda_graphs"] != "off" else "off"
    if settings["jit_compile"] == "auto":
        # JAX must compile (XLA): uncompiled, Keras runs it op by op, about ten
        # times slower. PyTorch runs eagerly: torch.compile took two minutes
        # per model here and then ran slower than eager on the CPU.
        # TensorFlow runs a graph (tf.function) either way; XLA is opt-in.
        settings["jit_compile"] = "on" if backend == "jax" else "off"
    return settings


@keras.saving.register_keras_serializable(package="kerasrot")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization, trained with PyTorch's fused kernel on the torch backend.

    Same weights, same config and the same results as the parent class:
    in training it normalises with the batch statistics and updates the
    moving ones with Keras' momentum and the biased batch variance, as the
    parent does; it only replaces a dozen elementwise passes by
    `torch.native_batch_norm` (one pass forward, one backward). Inference,
    frozen layers and every other backend use the parent class unchanged.
    """

    def call(self, inputs, training=None, mask=None):
        axis = self.axis if self.axis >= 0 else len(inputs.shape) + self.axis
        if keras.backend.backend() != "torch" or not (training and self.trainable) or mask is not None \
                or self.renorm or len(inputs.shape) != 4 or axis not in (1, 3):
            return super().call(inputs, training=training, mask=mask)
        import torch

        # Under mixed precision PyTorch's kernels (CPU and CUDA) take bfloat16
        # activations with float32 weights and compute the statistics in
        # float32, as the parent does: no casts, which would be two more
        # passes over the activations each way.
        x = inputs
        if axis == 3:
            x = x.permute(0, 3, 1, 2)  # a view: PyTorch reads it as channels_last memory
        gamma = self.gamma.value if self.scale else None
        beta = self.beta.value if self.center else None
        y, batch_mean, inverse_std = torch.native_batch_norm(x, gamma, beta, None, None, True, 0.0, self.epsilon)
        with torch.no_grad():
            # Keras' update, moving * momentum + batch * (1 - momentum), as one
            # in-place `lerp_` per statistic: two kernels where Keras' ops take
            # a dozen, which count inside a CUDA graph of small kernels.
            weight = 1.0 - self.momentum
            self.moving_mean.value.lerp_(batch_mean, weight)
            self.moving_variance.value.lerp_(inverse_std.pow(-2).sub_(self.epsilon), weight)
        if axis == 3:
            y = y.permute(0, 2, 3, 1)
        return keras.ops.cast(y, self.compute_dtype)


class ImplicitPadding:
    """For a layer that takes over the symmetric zero padding of the `ZeroPadding2D` before it.

    `implicit_padding` is that padding's width (`with_fast_layers` folds the
    two); the layer's own op pads on torch (NCHW), and `padded` pads the
    Keras way elsewhere. Shapes and config count the padding, so the layer
    stands in for the pair.
    """

    def __init__(self, *args, implicit_padding=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.implicit_padding = implicit_padding

    def padded(self, inputs):
        pad = self.implicit_padding
        spatial = ((pad, pad), (pad, pad))
        widths = ((0, 0), (0, 0), *spatial) if self.data_format == "channels_first" else ((0, 0), *spatial, (0, 0))
        return keras.ops.pad(inputs, widths) if pad else inputs

    def compute_output_shape(self, input_shape):
        pad, shape = self.implicit_padding, list(input_shape)
        for axis in (2, 3) if self.data_format == "channels_first" else (1, 2):
            shape[axis] = None if shape[axis] is None else shape[axis] + 2 * pad
        return super().compute_output_shape(tuple(shape))

    def get_config(self):
        return {**super().get_config(), "implicit_padding": self.implicit_padding}


@keras.saving.register_keras_serializable(package="kerasrot")
class ChannelsLastKernelConv2D(ImplicitPadding, keras.layers.Conv2D):
    """Keras' Conv2D, called as PyTorch's own Conv2d calls `conv2d` (torch backend, NCHW).

    Same weights and the same convolution; two things change how it runs:

    * Its kernel stays in PyTorch's channels_last memory. Keras stores a
      (height, width, in, out) kernel and hands PyTorch the (out, in,
      height, width) permuted view; a kernel stored out-major (memory order
      out, height, width, in) makes that view channels_last-contiguous, so
      oneDNN and cuDNN convolve it without reordering it, forward and
      backward, and the cast to bfloat16 keeps that layout. The variable is
      laid out once, when the layer is built; every assignment copies into it.
    * `implicit_padding`: the symmetric zero padding of a `ZeroPadding2D`
      that fed it (`with_fast_layers` folds the two), done by `conv2d`
      itself instead of a copy of the activations, forward and backward.
    """

    def build(self, input_shape):
        super().build(input_shape)
        if _torch_nchw(self):
            import torch

            value = self.kernel._value  # the variable's torch.nn.Parameter (Keras tracks it after `build`)
            out_major = value.detach().permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)  # same shape
            self.kernel._value = torch.nn.Parameter(out_major, requires_grad=value.requires_grad)

    def convolution_op(self, inputs, kernel):
        pad = self.implicit_padding
        if not _torch_nchw(self):  # elsewhere: the padding Keras' way, then the convolution
            return super().convolution_op(self.padded(inputs), kernel)
        import torch

        pads = [(pad, pad) if pad else padding_of(self.padding, size, self.kernel_size[axis], self.strides[axis],
                                                  self.dilation_rate[axis])
                for axis, size in enumerate(inputs.shape[2:])]
        taps = self._taps_of_windows(inputs, pads)
        if taps is not None:
            # The stored float32 kernel, not Keras' autocast copy of all of it: only the taps in use are cast.
            stored = kernel._value if isinstance(kernel, keras.Variable) else kernel
            return as_matrix_product(inputs, stored, taps, self.compute_dtype)
        kernel = keras.ops.convert_to_tensor(kernel).permute(3, 2, 0, 1)  # (out, in, h, w); compute dtype, layout kept
        if any(before != after for before, after in pads):  # conv2d pads symmetrically only
            inputs = torch.nn.functional.pad(inputs, [p for before_after in reversed(pads) for p in before_after])
            pads = [(0, 0)] * len(pads)
        return torch.nn.functional.conv2d(inputs, kernel, stride=self.strides, padding=[p for p, _ in pads],
                                          dilation=self.dilation_rate, groups=self.groups)

    def _taps_of_windows(self, inputs, pads):
        """`(rows, cols)` of `windows_over_the_whole_input` for these inputs, as ints and on their device; else None.

        Made once per input size and device, then reused: a step recorded as a
        CUDA graph may not copy indices to the GPU.
        """
        if self.groups != 1 or self.dilation_rate != (1, 1):
            return None
        key = (tuple(inputs.shape[2:]), str(inputs.device))
        cache = self.__dict__.setdefault("_taps_cache", {})  # not a tracked attribute of the layer
        if key not in cache:
            import torch

            taps = [windows_over_the_whole_input(size, self.kernel_size[axis], self.strides[axis], *pads[axis])
                    for axis, size in enumerate(inputs.shape[2:])]
            cache[key] = None if None in taps else (*taps, *(torch.tensor(t, device=inputs.device) for t in taps))
        return cache[key]


def padding_of(padding, size, kernel, stride, dilation=1):
    """`(before, after)`: the zeros Keras' "valid" or "same" padding adds to one axis of `size` (TensorFlow's rule)."""
    if padding == "valid":
        return 0, 0
    reach = (kernel - 1) * dilation + 1
    total = max(0, (math.ceil(size / stride) - 1) * stride + reach - size)
    return total // 2, total - total // 2


def windows_over_the_whole_input(size, kernel, stride, before, after):
    """`taps[j][p]`: the kernel tap that output j applies to input p along one axis, where every window spans
    the whole input; else None.

    At 32x32 with the ImageNet stem ResNet18's layer3 sees 2x2 maps and
    layer4 1x1 ones: each output of a padded 3x3 convolution there sees the
    whole map, and many of the multiplications `conv2d` makes are by the
    zeros of the padding (8 of 9 on a 1x1 map).
    """
    outputs = (size + before + after - kernel) // stride + 1
    taps = [[p - (j * stride - before) for p in range(size)] for j in range(outputs)]
    return taps if all(0 <= tap < kernel for row in taps for tap in row) else None


def as_matrix_product(inputs, kernel, taps, dtype):
    """A convolution whose every window spans its whole input, as one matrix product.

    With `taps = (rows, cols, ...)` from `windows_over_the_whole_input`,
    output (i, j, o) is the sum over every input (p, q, c) times
    `kernel[rows[i][p], cols[j][q], c, o]`: a dense matrix of exactly the
    multiplications by real pixels, which PyTorch multiplies several times
    faster than `conv2d` convolves such small maps. `kernel` is the stored
    (height, width, in, out) variable; inputs and outputs stay in
    channels_last memory.
    """
    batch, channels, height, width = inputs.shape
    weights = keras.ops.cast(tap_matrix().apply(kernel, *taps), dtype)
    outputs = inputs.permute(0, 2, 3, 1).reshape(batch, height * width * channels) @ weights
    return outputs.view(batch, len(taps[0]), len(taps[1]), kernel.shape[3]).permute(0, 3, 1, 2)


@functools.cache
def tap_matrix():
    """The autograd function `TapMatrix` (defined on first use: torch is there only on its backend)."""
    import torch

    class TapMatrix(torch.autograd.Function):
        """The matrix of `as_matrix_product`, gathered from the kernel's taps, with a reproducible gradient.

        PyTorch's own gather would add up the gradients of a tap that several
        (output, input) pairs share in threads, in an order that changes from
        run to run; here they are added in one fixed order, into a gradient
        laid out as the kernel variable (so no copy into its layout).
        """

        @staticmethod
        def forward(ctx, kernel, rows, cols, row_index, col_index):
            ctx.rows, ctx.cols, ctx.kernel = rows, cols, kernel
            blocks = kernel[row_index[:, None, :, None], col_index[None, :, None, :]]  # (i, j, p, q, in, out)
            out_rows, out_cols, height, width, channels, filters = blocks.shape
            return blocks.permute(2, 3, 4, 0, 1, 5).reshape(height * width * channels, out_rows * out_cols * filters)

        @staticmethod
        def backward(ctx, grad):
            rows, cols, kernel = ctx.rows, ctx.cols, ctx.kernel
            height, width = len(rows[0]), len(cols[0])
            blocks = grad.view(height, width, kernel.shape[2], len(rows), len(cols), kernel.shape[3])
            full = torch.zeros_like(kernel, memory_format=torch.preserve_format)
            for i, row_taps in enumerate(rows):
                for j, col_taps in enumerate(cols):
                    for p, row in enumerate(row_taps):
                        for q, col in enumerate(col_taps):
                            full[row, col] += blocks[p, q, :, i, j, :]
            return full, None, None, None, None

    return TapMatrix


def _torch_nchw(layer):
    return keras.backend.backend() == "torch" and layer.data_format == "channels_first"


def prepare_to_train(model, settings, log=print):
    """The speed-ups that act on a compiled model before its first step (in place) -> the model.

    With `channels_last_kernels`, the optimiser's slots take the kernels'
    layout; with `cuda_graphs`, the train and test steps are recorded once
    and replayed (`kerasrot.runner.cuda_graphs`).
    """
    if settings.get("channels_last_kernels") == "on":
        lay_out_slots_like_variables(model.optimizer)
    if settings.get("cuda_graphs") == "on":
        from kerasrot.runner import cuda_graphs

        cuda_graphs.install(model, log=log)
    return model


def lay_out_slots_like_variables(optimizer):
    """Has a torch `optimizer` lay each slot (SGD's momentum, Adam's moments) out as its variable.

    Keras creates every slot contiguous. Beside a kernel stored out-major
    (`ChannelsLastKernelConv2D`), PyTorch's multi-tensor update
    (`torch._foreach_add_(slots, gradients)`) then meets tensors of unlike
    strides and falls back to a slow elementwise path for every pair. Call it
    before the optimiser is built (its first step, or a restored checkpoint);
    every later assignment copies into the slot, keeping its layout.
    """
    import torch

    make_slot = optimizer.add_variable_from_reference

    def add_variable_like_reference(reference_variable, name=None, initializer="zeros"):
        slot = make_slot(reference_variable, name=name, initializer=initializer)
        like, value = reference_variable.value, slot.value
        if value.stride() != like.stride():
            same_layout = torch.empty_like(like, dtype=value.dtype).copy_(value)  # empty_like keeps strides
            slot._value = torch.nn.Parameter(same_layout, requires_grad=False)
        return slot

    optimizer.add_variable_from_reference = add_variable_like_reference
    return optimizer


@keras.saving.register_keras_serializable(package="kerasrot")
class PaddedMaxPooling2D(ImplicitPadding, keras.layers.MaxPooling2D):
    """Keras' MaxPooling2D after a symmetric zero padding, the padding done by `max_pool2d` (torch, NCHW).

    PyTorch pads a max-pool with minus infinity, which picks the same
    maxima as zeros where every input is at least zero: `with_fast_layers`
    folds only a padding whose input is a ReLU's output (ResNet's stem),
    and saves a padded copy of the activations, forward and backward.
    """

    def call(self, inputs):
        if not _torch_nchw(self):
            return super().call(self.padded(inputs))
        import torch

        return torch.nn.functional.max_pool2d(inputs, self.pool_size, self.strides, padding=self.implicit_padding)


# Each on/off speed setting that swaps a stock Keras layer for a faster stand-in.
FAST_LAYERS = {
    "fused_batchnorm": (keras.layers.BatchNormalization, FusedBatchNormalization),
    "channels_last_kernels": (keras.layers.Conv2D, ChannelsLastKernelConv2D),
}


def with_fast_layers(model, fused_batchnorm=False, channels_last_kernels=False):
    """A copy of `model` with `FusedBatchNormalization` and/or `ChannelsLastKernelConv2D` layers.

    `keras.models.clone_model` rebuilds the functional graph layer by layer,
    swapping the chosen stock classes (`FAST_LAYERS`); the copy gets the
    original's weights. With `channels_last_kernels`, a `ZeroPadding2D`
    named `<layer>_pad` (`kerasrot.models.conv`, the stem's pool) becomes an
    `Identity` and its symmetric padding moves into that convolution or
    max-pool (`implicit_padding`; a max-pool only after a ReLU).
    """
    chosen = {"fused_batchnorm": fused_batchnorm, "channels_last_kernels": channels_last_kernels}
    swaps = dict(FAST_LAYERS[key] for key, on in chosen.items() if on)
    if not swaps:
        return model
    folded = _foldable_paddings(model) if channels_last_kernels else {}  # conv name -> its ZeroPadding2D
    folded_pads = {pad.name for pad in folded.values()}

    def clone(layer):
        if layer.name in folded_pads:
            return keras.layers.Identity(name=layer.name, dtype=layer.dtype_policy)
        config = layer.get_config()
        if layer.name in folded:
            config["implicit_padding"] = folded[layer.name].padding[0][0]
        if type(layer) is keras.layers.MaxPooling2D and layer.name in folded:
            return PaddedMaxPooling2D.from_config(config)
        return swaps.get(type(layer), type(layer)).from_config(config)

    fast = keras.models.clone_model(model, clone_function=clone)
    fast.set_weights(model.get_weights())
    return fast


def _foldable_paddings(model):
    """{layer name: the symmetric ZeroPadding2D before it} for valid-padded Conv2Ds, and max-pools after a ReLU."""
    layers = {layer.name: layer for layer in model.layers}
    folded = {}
    for name, layer in layers.items():
        pad = layers.get(f"{name}_pad")
        if not isinstance(pad, keras.layers.ZeroPadding2D) or len(set(sum(pad.padding, ()))) != 1:
            continue
        conv = type(layer) is keras.layers.Conv2D and layer.padding == "valid"
        pool = type(layer) is keras.layers.MaxPooling2D and layer.padding == "valid" \
            and isinstance(pad.input._keras_history.operation, keras.layers.ReLU)  # inputs >= 0
        if conv or pool:
            folded[name] = pad
    return folded
