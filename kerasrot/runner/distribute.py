"""Distribute: data-parallel training on every accelerator, with `keras.distribution` (JAX).

Data parallelism keeps one copy of the model on every device and splits
each batch between them: every device computes the gradients of its part,
they are summed, and every copy takes the same step. Keras does all of it
on the JAX backend once a distribution is set, before the model is built:

    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=keras.distribution.list_devices()))

From then on every variable is created replicated on all devices, and
`model.fit` cuts every batch along its first axis, one slice per device.
The batch is still one array to XLA, so the loss is the mean over the
whole batch and BatchNormalization's statistics are those of the whole
batch, as on one device: same batch size, same learning rate, the same
training (to floating-point rounding).

The one rule: a batch must split evenly, so its samples (the images times
4 for the rotation task) must be a multiple of the number of devices.

Several machines: each runs the same command, and
`keras.distribution.initialize()` connects them first; it reads
`KERAS_DISTRIBUTION_JOB_ADDRESSES` (the coordinator's host:port),
`KERAS_DISTRIBUTION_NUM_PROCESSES` and `KERAS_DISTRIBUTION_PROCESS_ID`.
`list_devices()` then names the devices of every machine. Each process
feeds its own share of every training batch (`process_shard`, read by
`kerasrot.pipeline.Batches`), and Keras makes the global batch of them.

On the torch and TensorFlow backends Keras 3.15 has no `keras.distribution`
(torch: keras-team/keras#23316, in no release yet; TensorFlow: a prototype
marked "DO NOT USE" that its trainer never reads), so `--data-parallel` is
refused there.
"""

import os

import keras

MULTI_HOST_VARIABLES = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",  # the coordinator (process 0), host:port
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",  # 0 .. num_processes - 1
)


class DistributeError(Exception):
    """Data parallelism cannot run as asked; the message says why and what to do."""


def data_parallel(enabled):
    """Turns on Keras' data parallelism over every device (JAX) -> its description for provenance.

    Call it before any model is built, and on several machines before
    anything else touches JAX: `keras.distribution.initialize()` must be
    the first thing JAX does.
    """
    if not enabled:
        return description()
    backend = keras.backend.backend()
    if backend != "jax":
        raise DistributeError(
            f"--data-parallel needs the JAX backend: run KERAS_BACKEND=jax kerasrot run ... --data-parallel "
            f"(Keras {keras.__version__} has keras.distribution for JAX only; for torch it is "
            f"keras-team/keras#23316, not released; for tensorflow a prototype)"
        )
    if any(name in os.environ for name in MULTI_HOST_VARIABLES):
        # Connects the processes: from now on JAX sees the devices of every machine.
        keras.distribution.initialize()
    devices = keras.distribution.list_devices()
    # auto_shard_dataset=False: Keras splits only a tf.data.Dataset between
    # processes itself, and refuses a PyDataset such as our Batches unless
    # told that each process feeds its own part (`process_shard`).
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False))
    return description()


def device_count():
    """Devices that share each batch: 1 without a distribution."""
    distribution = keras.distribution.distribution()
    return 1 if distribution is None else int(distribution.device_mesh.devices.size)


def process_shard():
    """`(index, count)`: this process feeds part `index` of `count` of every batch; `(0, 1)` on one machine.

    `model.fit` takes each process's batch as that process's slice of the
    global batch (`jax.make_array_from_process_local_data`), so with
    several processes each must yield `batch_size / count` of the images.
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 0, 1
    return distribution.data_shard_id, distribution.num_processes


def description():
    """E.g. "1 device" or "2 devices (cpu), keras.distribution.DataParallel"."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return "1 device"
    devices = [str(d) for d in distribution.device_mesh.devices.flatten()]
    kinds = sorted({d.split(":")[0] for d in devices})
    processes = f" on {distribution.num_processes} processes" if distribution.num_processes > 1 else ""
    plural = "s" if len(devices) > 1 else ""
    engine = f"keras.distribution.{type(distribution).__name__}"
    return f"{len(devices)} device{plural} ({', '.join(kinds)}){processes}, {engine}"


def splits_evenly(images, copies=1, shared_by=None):
    """Whether a batch of `images` (`copies` samples each) splits evenly over the devices.

    `shared_by`: how many processes each feed a slice of it (default: all of
    them); a batch that every process feeds whole (`shared_by=1`) becomes
    that many copies in the global batch: wasted work, the same mean.
    """
    devices, (_, processes) = device_count(), process_shard()
    shared_by = processes if shared_by is None else shared_by
    if images % shared_by:
        return False
    return (images * copies * processes // shared_by) % devices == 0


def check_batch_sizes(stages):
    """Raises DistributeError unless every stage's batch splits evenly over the devices (and processes)."""
    devices, (_, processes) = device_count(), process_shard()
    for stage in stages:
        images = stage.settings["batch_size"]
        copies = 4 if stage.task == "rotation" else 1  # each image and its three quarter turns
        if not splits_evenly(images, copies):
            samples = f"{images} images x 4 rotations = {images * copies} samples" if copies > 1 \
                else f"{images} samples"
            raise DistributeError(
                f"--data-parallel splits every batch over {devices} devices"
                + (f" of {processes} processes" if processes > 1 else "")
                + f": {stage.task}.batch_size={images} gives {samples}, which do not split evenly; "
                f"choose another with --set {stage.task}.batch_size=N"
            )


def check_batches(stage, *batches):
    """Raises DistributeError unless every batch of each `Batches`, the last and shorter one too, splits evenly.

    The last batch of an epoch or of the test set holds what is left over;
    under data parallelism it must split over the devices like the others.
    """
    if device_count() == 1:
        return
    for which in batches:
        left = which.epoch_length % which.batch_size
        copies = 4 if which.rotations else 1
        if left and not splits_evenly(left, copies, getattr(which, "process_count", 1)):
            raise DistributeError(
                f"--data-parallel splits every batch over {device_count()} devices, but the last batch of "
                f"stage {stage.name}'s {which.epoch_length} {'train' if which.shuffle else 'test'} images holds "
                f"{left} ({left * copies} samples); change {stage.task}.batch_size, samples_per_epoch, "
                f"images_per_class or test_images_per_class so that it splits"
            )
