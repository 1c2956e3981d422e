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


def cpu_has_native_bfloat16():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve(data_format="auto", precision="auto"):
    """Turns "auto" into a concrete data format and precision for this backend/device."""
    backend = name()
    if data_format == "auto":
        data_format = "channels_first" if backend == "torch" else "channels_last"
    if precision == "auto":
        native = has_gpu() or (backend == "torch" and cpu_has_native_bfloat16())
        precision = "mixed_bfloat16" if native else "float32"
    return data_format, precision


@contextlib.contextmanager
def layout(data_format="channels_last", precision="float32"):
    """Builds models inside with this data format and dtype policy, then restores both."""
    old_format = keras.config.image_data_format()
    old_policy = keras.config.dtype_policy()
    keras.config.set_image_data_format(data_format)
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_image_data_format(old_format)
        keras.config.set_dtype_policy(old_policy)


def device_description():
    """A short description of the machine, for the provenance of results."""
    if has_gpu():
        backend = name()
        if backend == "torch":
            import torch

            return f"GPU {torch.cuda.get_device_name(0)}"
        return f"GPU ({backend})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores"
