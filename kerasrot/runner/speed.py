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
  before a strided convolution (a copy of the activations each way).
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

        # Statistics in float32 under mixed precision, as the parent computes them.
        # PyTorch's CUDA kernel takes bfloat16 activations with float32
        # weights and accumulates in float32 itself, so on a GPU the two
        # casts (two more passes over the activations) are left out.
        x = inputs if inputs.is_cuda else inputs.float()
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


@keras.saving.register_keras_serializable(package="kerasrot")
class ChannelsLastKernelConv2D(keras.layers.Conv2D):
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

    def __init__(self, *args, implicit_padding=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.implicit_padding = implicit_padding

    def build(self, input_shape):
        super().build(input_shape)
        if _torch_nchw(self):
            import torch

            value = self.kernel._value  # the variable's torch.nn.Parameter (Keras tracks it after `build`)
            out_major = value.detach().permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)  # same shape
            self.kernel._value = torch.nn.Parameter(out_major, requires_grad=value.requires_grad)

    def convolution_op(self, inputs, kernel):
        pad = self.implicit_padding
        if not pad:
            return super().convolution_op(inputs, kernel)
        if not _torch_nchw(self):  # elsewhere: the padding Keras' way, then the convolution
            spatial = ((pad, pad), (pad, pad))
            widths = ((0, 0), (0, 0), *spatial) if self.data_format == "channels_first" else ((0, 0), *spatial, (0, 0))
            return super().convolution_op(keras.ops.pad(inputs, widths), kernel)
        import torch

        kernel = keras.ops.convert_to_tensor(kernel)  # cast to the compute dtype, layout kept
        return torch.nn.functional.conv2d(inputs, kernel.permute(3, 2, 0, 1), stride=self.strides, padding=pad,
                                          dilation=self.dilation_rate, groups=self.groups)

    def compute_output_shape(self, input_shape):
        pad, shape = self.implicit_padding, list(input_shape)
        for axis in (2, 3) if self.data_format == "channels_first" else (1, 2):
            shape[axis] = None if shape[axis] is None else shape[axis] + 2 * pad
        return super().compute_output_shape(tuple(shape))

    def get_config(self):
        return {**super().get_config(), "implicit_padding": self.implicit_padding}


def _torch_nchw(layer):
    return keras.backend.backend() == "torch" and layer.data_format == "channels_first"


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
    named `<conv>_pad` (`kerasrot.models.conv`) becomes an `Identity` and its
    symmetric padding moves into that convolution (`implicit_padding`).
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
        return swaps.get(type(layer), type(layer)).from_config(config)

    fast = keras.models.clone_model(model, clone_function=clone)
    fast.set_weights(model.get_weights())
    return fast


def _foldable_paddings(model):
    """{conv name: the symmetric ZeroPadding2D before it} for every valid-padded Conv2D."""
    layers = {layer.name: layer for layer in model.layers}
    folded = {}
    for name, layer in layers.items():
        pad = layers.get(f"{name}_pad")
        if type(layer) is keras.layers.Conv2D and layer.padding == "valid" \
                and isinstance(pad, keras.layers.ZeroPadding2D) and len(set(sum(pad.padding, ()))) == 1:
            folded[name] = pad
    return folded
