"""The one place for backend- and device-specific choices.

Model, data and training code is backend-agnostic Keras. Two settings make
it fast, and both depend on where it runs:

* `data_format`: the PyTorch backend computes convolutions in NCHW; with
  Keras' default NHWC (`channels_last`) every convolution transposes its
  input and kernel and copies them (about 15% of a CPU training step). With
  `channels_first` the network works in NCHW from the first layer. JAX and
  TensorFlow prefer NHWC, and TensorFlow's CPU kernels support nothing else.
* `precision`: `mixed_bfloat16` computes in bfloat16 with float32 weights.
  It pays where the hardware does bfloat16 natively (recent NVIDIA GPUs,
  CPUs with AVX512-BF16 or AMX under PyTorch), and costs elsewhere.
* `jit_compile`: on for JAX, which is slow uncompiled (`resolve_jit_compile`).
* `fused_batchnorm`: Keras builds BatchNormalization from elementwise ops
  (mean, square, subtract, rsqrt, ...), each a pass over the activations
  forward and again backward. On the PyTorch backend that is about 40% of
  a CPU training step; `FusedBatchNormalization` below calls PyTorch's
  fused kernel instead, with Keras' semantics. Other backends fuse these
  ops themselves (XLA), so there it changes nothing.
* TensorFlow's oneDNN kernels: on by default in `kerasrot/__init__.py`,
  because TensorFlow reads that switch when it is imported (see there).

"auto" picks per backend and device; the choice is recorded with results.
Checkpoints that we hand to users are always re-exported as NHWC float32
(`kerasrot.models.export`), so they load and agree on every backend.
"""

import contextlib
import os
import platform

import keras

DATA_FORMATS = ("auto", "channels_last", "channels_first")
PRECISIONS = ("auto", "float32", "mixed_bfloat16")
FUSED_BATCHNORM = ("auto", "on", "off")
JIT_COMPILE = ("auto", "on", "off")


def name():
    return keras.backend.backend()


def has_gpu():
    backend = name()
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    if backend == "jax":
        import jax

        return jax.default_backend() == "gpu"
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _cpuinfo(field):
    """The first CPU's `field` in /proc/cpuinfo (Linux), e.g. "model name"; None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return None


def _cpu_flags():
    """The CPU's feature flags, e.g. {"avx2", "avx512f", ...}; empty where unknown."""
    return set((_cpuinfo("flags") or "").split())


def cpu_has_native_bfloat16():
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def cpu_vector_extensions():
    """The widest vector instructions the CPU has, e.g. "AVX512-BF16" or "AVX2".

    Virtual machines often report only "AMD EPYC" as the model name, while
    one with AVX-512 trains several times faster than one with AVX2 only;
    so timings name this beside the model.
    """
    flags = _cpu_flags()
    for flag, label in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"),
                        ("avx512f", "AVX-512"), ("avx2", "AVX2")):
        if flag in flags:
            return label
    return None


def resolve(data_format="auto", precision="auto", fused_batchnorm="auto"):
    """Turns "auto" into concrete choices for this backend and device.

    Returns `(data_format, precision, fused_batchnorm)`; the last is "on" or "off".
    """
    backend = name()
    if data_format == "auto":
        data_format = "channels_first" if backend == "torch" else "channels_last"
    if precision == "auto":
        native = has_gpu() or (backend == "torch" and cpu_has_native_bfloat16())
        precision = "mixed_bfloat16" if native else "float32"
    if fused_batchnorm == "auto" or backend != "torch":
        fused_batchnorm = "on" if backend == "torch" else "off"
    return data_format, precision, fused_batchnorm


def resolve_jit_compile(jit_compile="auto"):
    """Whether to compile the train step: "on" or "off".

    JAX must compile (XLA): uncompiled, Keras runs it op by op in Python,
    about ten times slower. PyTorch runs eagerly; `torch.compile` took two
    minutes per model here and then ran slower than eager on the CPU.
    TensorFlow runs a graph (`tf.function`) either way; XLA is opt-in.
    """
    if jit_compile == "auto":
        return "on" if name() == "jax" else "off"
    return jit_compile


_fused_batchnorm = False  # set by `layout`, read by `batch_normalization`


@contextlib.contextmanager
def layout(data_format="channels_last", precision="float32", fused_batchnorm="off"):
    """Builds models inside with this data format, dtype policy and BatchNorm, then restores them."""
    global _fused_batchnorm
    old = keras.config.image_data_format(), keras.config.dtype_policy(), _fused_batchnorm
    keras.config.set_image_data_format(data_format)
    keras.config.set_dtype_policy(precision)
    _fused_batchnorm = fused_batchnorm == "on" and name() == "torch"
    try:
        yield
    finally:
        keras.config.set_image_data_format(old[0])
        keras.config.set_dtype_policy(old[1])
        _fused_batchnorm = old[2]


def batch_normalization(**kwargs):
    """A BatchNormalization layer: Keras' own, or the fused one inside `layout(fused_batchnorm="on")`."""
    if _fused_batchnorm:
        return FusedBatchNormalization(**kwargs)
    return keras.layers.BatchNormalization(**kwargs)


@keras.saving.register_keras_serializable(package="kerasrot")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """Keras' BatchNormalization, trained with PyTorch's fused kernel on the torch backend.

    Same weights, same config and the same results as the parent class:
    in training it normalises with the batch statistics and updates the
    moving ones with Keras' momentum and the biased batch variance, as the
    parent does; it only replaces a dozen elementwise passes by
    `torch.native_batch_norm` (one pass forward, one backward). Inference,
    frozen layers and every other backend use the parent class unchanged.
    Exported checkpoints use the parent class (`kerasrot.models.export`).
    """

    def call(self, inputs, training=None, mask=None):
        axis = self.axis if self.axis >= 0 else len(inputs.shape) + self.axis
        if name() != "torch" or not (training and self.trainable) or mask is not None or self.renorm \
                or len(inputs.shape) != 4 or axis not in (1, 3):
            return super().call(inputs, training=training, mask=mask)
        import torch

        x = inputs.float()  # as the parent: statistics in float32 under mixed precision
        if axis == 3:
            x = x.permute(0, 3, 1, 2)  # a view: PyTorch reads it as channels_last memory
        gamma = self.gamma.value if self.scale else None
        beta = self.beta.value if self.center else None
        y, batch_mean, inverse_std = torch.native_batch_norm(x, gamma, beta, None, None, True, 0.0, self.epsilon)
        with torch.no_grad():
            batch_variance = inverse_std.pow(-2) - self.epsilon
            self.moving_mean.assign(self.moving_mean * self.momentum + batch_mean * (1.0 - self.momentum))
            self.moving_variance.assign(
                self.moving_variance * self.momentum + batch_variance * (1.0 - self.momentum)
            )
        if axis == 3:
            y = y.permute(0, 2, 3, 1)
        return keras.ops.cast(y, self.compute_dtype)


def cpu_description():
    """E.g. "AMD EPYC (AVX2), 2 cores": model name, widest vector extensions, cores."""
    cpu = _cpuinfo("model name") or platform.processor() or platform.machine()
    extensions = cpu_vector_extensions()
    return cpu + (f" ({extensions})" if extensions else "") + f", {os.cpu_count()} cores"


def device_description():
    """A short description of the machine, for the provenance of results."""
    if has_gpu():
        return f"GPU {gpu_name()}"
    return f"CPU {cpu_description()}"


def gpu_name():
    """The first GPU's model name as the backend reports it ("NVIDIA H200")."""
    backend = name()
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0)
    if backend == "jax":
        import jax

        return jax.devices()[0].device_kind
    import tensorflow as tf

    gpu = tf.config.list_physical_devices("GPU")[0]
    return tf.config.experimental.get_device_details(gpu).get("device_name", "(tensorflow)")
