"""Device: what the current backend computes on, for speed choices and the provenance of results."""

import os
import platform

import keras

from kerasrot.runner import distribute


def has_gpu():
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    if backend == "jax":
        import jax

        return jax.default_backend() == "gpu"
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def gpu_name():
    """The first GPU's model name as the backend reports it ("NVIDIA H200")."""
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0)
    if backend == "jax":
        import jax

        return jax.devices()[0].device_kind
    import tensorflow as tf

    gpu = tf.config.list_physical_devices("GPU")[0]
    return tf.config.experimental.get_device_details(gpu).get("device_name", "(tensorflow)")


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


def cpu_flags():
    """The CPU's feature flags, e.g. {"avx2", "avx512f", ...}; empty where unknown."""
    return set((_cpuinfo("flags") or "").split())


def cpu_has_native_bfloat16():
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_vector_extensions():
    """The widest vector instructions the CPU has, e.g. "AVX512-BF16" or "AVX2".

    Virtual machines often report only "AMD EPYC" as the model name, while
    one with AVX-512 trains several times faster than one with AVX2 only;
    so timings name this beside the model.
    """
    flags = cpu_flags()
    for flag, label in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"),
                        ("avx512f", "AVX-512"), ("avx2", "AVX2")):
        if flag in flags:
            return label
    return None


def cpu_description():
    """E.g. "AMD EPYC (AVX2), 2 cores": model name, widest vector extensions, cores."""
    cpu = _cpuinfo("model name") or platform.processor() or platform.machine()
    extensions = cpu_vector_extensions()
    return cpu + (f" ({extensions})" if extensions else "") + f", {os.cpu_count()} cores"


def description():
    """A short description of the machine, e.g. "GPU NVIDIA H200" or "CPU AMD EPYC (AVX2), 2 cores".

    Under data parallelism (`kerasrot.runner.distribute`) it adds the devices
    that share each batch: "...; 8 JAX devices, data-parallel".
    """
    machine = f"GPU {gpu_name()}" if has_gpu() else f"CPU {cpu_description()}"
    if keras.distribution.distribution() is None:
        return machine
    count, (_, processes) = distribute.device_count(), distribute.process_shard()
    on = f" on {processes} processes" if processes > 1 else ""
    return f"{machine}; {count} {keras.backend.backend().upper()} device{'s' if count > 1 else ''}{on}, data-parallel"


def torch_on_cuda():
    if keras.backend.backend() != "torch":
        return False
    import torch

    return torch.cuda.is_available()


def fed(batches):
    """`batches` as the device wants them fed: as they are, or `HostBatches` under torch on a CUDA GPU."""
    return HostBatches(batches) if torch_on_cuda() else batches


class HostBatches(keras.utils.PyDataset):
    """`kerasrot.pipeline.Batches` made on the host's CPU and copied to the GPU without waiting.

    Under torch on a CUDA GPU, every `keras.ops` call with a NumPy array
    copies it to the GPU from ordinary (pageable) memory, which waits until
    the GPU has finished every step queued before it. So the pixel work of a
    batch runs on the CPU, and the batch goes to the GPU in one copy through
    pinned memory with `non_blocking=True`: queued behind the running step,
    while the host goes on preparing the next batch (PyTorch keeps the
    pinned buffer until the copy is done). Everything else (`set_epoch`,
    `num_samples`, ...) is the wrapped batches'.
    """

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        import torch

        with keras.device("cpu"):
            arrays = self.batches[index]
        return tuple(torch.as_tensor(a).contiguous().pin_memory().to("cuda", non_blocking=True) for a in arrays)

    def __getattr__(self, name):  # only for what this class does not have itself
        return getattr(self.__dict__["batches"], name)
