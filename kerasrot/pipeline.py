"""Pipeline: from arrays of images to the batches that `model.fit` consumes.

The idea of RotNet in one function: `four_rotations` turns a batch of B
images into 4B images, every image as its four exact `rot90` copies, with
the number of quarter turns (0-3) as its label. All four copies of an image
are in the same batch, as in the paper.

Augmentation (pad-4-and-crop, horizontal flip) is applied once per image
*before* rotating, so the rotation label stays true: a horizontally flipped
upright image is still upright. (A vertical flip would not be: it equals a
180-degree turn of the horizontal flip, and would contradict the label.)

Random choices (the order of the images and every crop offset and flip)
are drawn with NumPy from `(seed, epoch)`, so an epoch is the same whichever
pipeline runs it, and a resumed run repeats exactly the epoch it lost.

Two pipelines make the pixels, chosen with `--pipeline`:
* `memory`: NumPy indexing and `keras.ops`, on the accelerator of the
  current backend; needs no TensorFlow (the lent GPU machines have none).
* `tfdata`: `tf.data` with parallel map and prefetch on the CPU, the
  classic Keras input pipeline.
Both yield the same images and labels (tests/test_pipeline.py checks it).
"""

import math

import keras
import numpy as np
from keras import ops

PIPELINES = ("memory", "tfdata")
CROP_PADDING = 4
NUM_ROTATIONS = 4


def four_rotations(images):
    """`[B, H, W, C]` images -> their `[4B, H, W, C]` quarter turns and labels 0-3.

    Turns are counter-clockwise (`np.rot90`, `tf.image.rot90`); copy k of
    every image is at rows `k*B .. (k+1)*B - 1`.
    """
    rotated = [ops.rot90(images, k=k, axes=(1, 2)) for k in range(NUM_ROTATIONS)]
    batch = ops.shape(images)[0]
    labels = ops.repeat(ops.arange(NUM_ROTATIONS, dtype="int32"), batch)
    return ops.concatenate(rotated, axis=0), labels


def crop_and_flip(images, offsets, flips):
    """Pads by `CROP_PADDING`, crops each image at its own `(dy, dx)` and flips some.

    `offsets` is `[B, 2]` in `[0, 2 * CROP_PADDING]`, `flips` is `[B]` booleans.
    Each image's crop is a gather of its own rows, then of its own columns; a
    horizontal flip is the same columns in reverse order, so it costs nothing.
    Exact, vectorised, and the same on every backend.
    """
    batch, height, width, channels = images.shape
    p = CROP_PADDING
    padded = ops.pad(ops.convert_to_tensor(images), [[0, 0], [p, p], [p, p], [0, 0]])
    offsets = ops.convert_to_tensor(offsets, dtype="int32")
    rows = ops.add(offsets[:, :1], ops.arange(height, dtype="int32")[None, :])  # [B, H]
    cols = ops.add(offsets[:, 1:], ops.arange(width, dtype="int32")[None, :])  # [B, W]
    flips = ops.convert_to_tensor(flips, dtype="bool")[:, None]
    cols = ops.where(flips, ops.flip(cols, axis=1), cols)
    rows = ops.broadcast_to(rows[:, :, None, None], (batch, height, width + 2 * p, channels))
    cols = ops.broadcast_to(cols[:, None, :, None], (batch, height, width, channels))
    return ops.take_along_axis(ops.take_along_axis(padded, rows, axis=1), cols, axis=2)


class EpochPlan:
    """The order of the images and their augmentation for one epoch.

    Args:
        num_images: size of the dataset.
        epoch_length: images per epoch; more than `num_images` repeats the
            data (fresh order each pass), as RotNet's semi-supervised runs do.
        seed, epoch: the plan is a function of these two alone.
        shuffle, augment: off for test sets.
    """

    def __init__(self, num_images, epoch_length, seed, epoch, shuffle, augment):
        rng = np.random.default_rng([seed, epoch])
        passes = math.ceil(epoch_length / num_images)
        if shuffle:
            order = np.concatenate([rng.permutation(num_images) for _ in range(passes)])
        else:
            order = np.tile(np.arange(num_images), passes)
        self.order = order[:epoch_length]
        if augment:
            self.offsets = rng.integers(0, 2 * CROP_PADDING + 1, size=(epoch_length, 2))
            self.flips = rng.random(epoch_length) < 0.5
        else:
            self.offsets = np.full((epoch_length, 2), CROP_PADDING)
            self.flips = np.zeros(epoch_length, dtype=bool)


class Batches(keras.utils.PyDataset):
    """Batches of images (or of their four rotations) for one stage.

    A `keras.utils.PyDataset`: `model.fit` asks for batch `i` of the current
    epoch. Call `set_epoch` at the start of every epoch (the `EpochSetter`
    callback does) so that the epoch's plan is the one for that epoch number.

    Args:
        images: uint8 array `[N, H, W, 3]`.
        labels: int array `[N]` (ignored when `rotations=True`).
        batch_size: images per batch, before the 4x of rotation.
        rotations: yield the four rotations with labels 0-3 instead of `labels`.
        augment, shuffle: pad-crop-flip, and a new order every epoch.
        seed: seeds every random choice, together with the epoch number.
        epoch_length: images per epoch (default: every image once).
        pipeline: "memory" or "tfdata".
    """

    def __init__(
        self,
        images,
        labels,
        batch_size,
        rotations=False,
        augment=False,
        shuffle=False,
        seed=0,
        epoch_length=None,
        pipeline="memory",
    ):
        super().__init__()
        if pipeline not in PIPELINES:
            raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
        if len(images) == 0:
            raise ValueError("no images to make batches from")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, np.asarray(labels, dtype="int32")
        self.batch_size, self.rotations = batch_size, rotations
        self.augment, self.shuffle, self.seed = augment, shuffle, seed
        self.epoch_length = epoch_length or len(images)
        self.pipeline = pipeline
        self._tf_arrays = None
        self.set_epoch(0)

    def __len__(self):
        return math.ceil(self.epoch_length / self.batch_size)

    @property
    def num_samples(self):
        """Samples per epoch as the model sees them (4 per image with rotations)."""
        return self.epoch_length * (NUM_ROTATIONS if self.rotations else 1)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.plan = EpochPlan(
            len(self.images), self.epoch_length, self.seed, epoch, self.shuffle, self.augment
        )
        self._tf_iterator, self._tf_next = None, 0

    def __getitem__(self, index):
        if index >= len(self):
            raise IndexError(index)
        if self.pipeline == "tfdata":
            return self._tfdata_batch(index)
        return self._memory_batch(index)

    # -- memory: NumPy gathers, keras.ops does the pixel work ---------------

    def _memory_batch(self, index):
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        indices = self.plan.order[part]
        images = ops.convert_to_tensor(self.images[indices], dtype="float32")
        if self.augment:
            offsets = ops.convert_to_tensor(self.plan.offsets[part], dtype="int32")
            flips = ops.convert_to_tensor(self.plan.flips[part])
            images = crop_and_flip(images, offsets, flips)
        if self.rotations:
            return four_rotations(images)
        return images, ops.convert_to_tensor(self.labels[indices])

    # -- tfdata: the same steps as a tf.data graph --------------------------

    def tf_arrays(self):
        """The images and labels as TensorFlow tensors, made once, not every epoch."""
        if self._tf_arrays is None:
            import tensorflow as tf

            self._tf_arrays = tf.constant(self.images), tf.constant(self.labels)
        return self._tf_arrays

    def _tfdata_batch(self, index):
        # tf.data is sequential; Keras asks for batches in order, but some
        # callers (the TensorFlow backend's spec probe) jump: restart there.
        if self._tf_iterator is None or index != self._tf_next:
            dataset = tfdata_batches(self)
            self._tf_iterator = iter(dataset.skip(index))
        self._tf_next = index + 1
        images, labels = next(self._tf_iterator)
        return images.numpy(), labels.numpy()


def tfdata_batches(batches):
    """The `tf.data.Dataset` of one epoch of `batches` (a `Batches`)."""
    import tensorflow as tf

    plan = batches.plan
    source = tf.data.Dataset.from_tensor_slices(
        (plan.order, plan.offsets.astype("int32"), plan.flips)
    ).batch(batches.batch_size)
    images, labels = batches.tf_arrays()

    def make_batch(indices, offsets, flips):
        x = tf.cast(tf.gather(images, indices), tf.float32)
        if batches.augment:
            x = _tf_crop_and_flip(x, offsets, flips)
        if batches.rotations:
            rotated = [tf.image.rot90(x, k) for k in range(NUM_ROTATIONS)]
            y = tf.repeat(tf.range(NUM_ROTATIONS, dtype=tf.int32), tf.shape(x)[0])
            return tf.concat(rotated, axis=0), y
        return x, tf.gather(labels, indices)

    return source.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
        tf.data.AUTOTUNE
    )


def _tf_crop_and_flip(images, offsets, flips):
    """`crop_and_flip` in TensorFlow ops (gathers instead of einsums)."""
    import tensorflow as tf

    height, width = images.shape[1], images.shape[2]
    p = CROP_PADDING
    padded = tf.pad(images, [[0, 0], [p, p], [p, p], [0, 0]])
    rows = offsets[:, :1] + tf.range(height)[None, :]
    cols = offsets[:, 1:] + tf.range(width)[None, :]
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    cropped = tf.gather(cropped, cols, axis=2, batch_dims=1)
    return tf.where(flips[:, None, None, None], tf.reverse(cropped, axis=[2]), cropped)


class EpochSetter(keras.callbacks.Callback):
    """Tells the training `Batches` which epoch starts (also after a resume)."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.set_epoch(epoch)


def default_pipeline():
    """`memory`, measured faster everywhere we ran it.

    On a 2-core CPU (ResNet18, batch 512, PyTorch backend) `memory` fed
    540 samples/s of training, `tfdata` 313: tf.data's threads compete with
    the training step for the same cores. On a GPU, `memory` augments on
    the device. `tfdata` stays available with `--pipeline tfdata`.
    """
    return "memory"
