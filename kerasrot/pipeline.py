"""Pipeline: from arrays of images to the batches that `model.fit` consumes.

A batch is made in three steps, the same for every stage: gather the
epoch's next images, crop and flip them (training only), and for the
rotation task replace them by their four rotations (`kerasrot.rotations`).

Every random choice (the order of the images, each crop offset and flip)
is drawn with NumPy from `(seed, epoch)` alone: `EpochPlan`. So an epoch is
the same whichever pipeline runs it, and a resumed run repeats exactly the
epoch it lost.

Two pipelines run those steps, in different places (`--pipeline`):
* `memory`: `Batches`, a `keras.utils.PyDataset`; `keras.ops` does the pixel
  work on the backend's device. Needs no TensorFlow; the default, and the
  faster on the machines we measured (results/benchmarks.md).
* `tfdata`: `Batches.as_tf_dataset()`, a `tf.data.Dataset` that runs the
  same functions as `tensorflow.experimental.numpy` in tf.data's threads,
  prefetching while the model trains.

Either reads a streamed split (`kerasrot.folders.ImageFiles`) the same way:
a batch's images are read from disk when the batch is made, so memory holds
the batches in flight, not the dataset, and a resumed epoch reads the same
files in the same order.
"""

import math

import keras
import numpy as np

from kerasrot.folders import ImageFiles
from kerasrot.rotations import CROP_PADDING, NUM_ROTATIONS, crop_and_flip, four_rotations

PIPELINES = ("memory", "tfdata")


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
        self.order = order[:epoch_length].astype("int32")
        if augment:
            self.offsets = rng.integers(0, 2 * CROP_PADDING + 1, size=(epoch_length, 2)).astype("int32")
            self.flips = rng.random(epoch_length) < 0.5
        else:
            self.offsets = np.full((epoch_length, 2), CROP_PADDING, dtype="int32")
            self.flips = np.zeros(epoch_length, dtype=bool)

    def batch(self, index, batch_size, process_shard=(0, 1)):
        """`(images' indices, crop offsets, flips)` of batch `index`: this process's share of it.

        With data parallelism over several machines each process feeds
        `1 / process_count` of every batch, its own slice in order, and
        Keras makes the global batch of them (`kerasrot.runner.distribute`).
        """
        process_index, process_count = process_shard
        start = index * batch_size
        share = (min(start + batch_size, len(self.order)) - start) // process_count
        part = slice(start + process_index * share, start + (process_index + 1) * share)
        return self.order[part], self.offsets[part], self.flips[part]


class Batches(keras.utils.PyDataset):
    """Batches of images (or of their four rotations) for one stage.

    `model.fit` asks for batch `i` of the current epoch. Call `set_epoch` at
    the start of every epoch (the `EpochSetter` callback does) so that the
    plan is the one of that epoch number, also after a resume.

    Args:
        images: uint8 array `[N, H, W, 3]`, or `kerasrot.folders.ImageFiles`
            (streamed: each batch reads its images from disk).
        labels: int array `[N]` (ignored when `rotations=True`).
        batch_size: images per batch, before the 4x of rotation.
        rotations: yield the four rotations with labels 0-3 instead of `labels`.
        augment, shuffle: pad-crop-flip, and a new order every epoch.
        seed: seeds every random choice, together with the epoch number.
        epoch_length: images per epoch (default: every image once).
        process_shard: `(index, count)`: on several machines, yield this
            process's share of every batch (`EpochPlan.batch`).
    """

    def __init__(self, images, labels, batch_size, rotations=False, augment=False, shuffle=False, seed=0,
                 epoch_length=None, process_shard=(0, 1)):
        super().__init__()
        if len(images) == 0:
            raise ValueError("no images to make batches from")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, np.asarray(labels, dtype="int32")
        self.batch_size, self.rotations = batch_size, rotations
        self.augment, self.shuffle, self.seed = augment, shuffle, seed
        self.epoch_length = epoch_length or len(images)
        self.process_shard = process_shard
        self.set_epoch(0)

    def __len__(self):
        return math.ceil(self.epoch_length / self.batch_size)

    @property
    def num_samples(self):
        """Samples per epoch as the model sees them (4 per image with rotations)."""
        return self.epoch_length * (NUM_ROTATIONS if self.rotations else 1)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.plan = EpochPlan(len(self.images), self.epoch_length, self.seed, epoch, self.shuffle, self.augment)

    def of(self, arrays):
        """The same batches (order, epochs, process share) of `arrays` in place of the images.

        `arrays[i]` stands for image i: its frozen features, say
        (`kerasrot.frozen`). Crops, flips and rotations are of images, so
        these batches must have none.
        """
        if self.augment or self.rotations:
            raise ValueError("batches with crop + flip or rotations make them from images: they take no other arrays")
        return Batches(arrays, self.labels, self.batch_size, shuffle=self.shuffle, seed=self.seed,
                       epoch_length=self.epoch_length, process_shard=self.process_shard)

    def make_batch(self, images, labels, offsets, flips, xp=keras.ops):
        """The pixel work of one batch, with the array module `xp` (see `kerasrot.rotations`).

        Crops, flips and quarter turns move pixels without changing them, so
        they run on the images as they come (uint8: a quarter of the bytes
        of float32) and the batch becomes float32 last.
        """
        if self.augment:
            images = crop_and_flip(images, offsets, flips, xp)
        if self.rotations:
            images, labels = four_rotations(images, xp)
        return xp.array(images, dtype="float32"), labels

    def __getitem__(self, index):
        if index >= len(self):
            raise IndexError(index)
        indices, offsets, flips = self.plan.batch(index, self.batch_size, self.process_shard)
        arrays = self.images[indices], self.labels[indices], offsets, flips
        return self.make_batch(*(keras.ops.convert_to_tensor(array) for array in arrays))

    def as_tf_dataset(self):
        """The same batches as a `tf.data.Dataset`, for `model.fit` on any backend.

        The plan is read when an epoch's iteration starts, which Keras does
        after `on_epoch_begin` (so after `EpochSetter`); the test that both
        pipelines train a model alike over two epochs guards that.
        """
        import tensorflow as tf
        import tensorflow.experimental.numpy as tnp

        labels = tf.constant(self.labels)
        if isinstance(self.images, ImageFiles):  # streamed: tf.data's threads read the files
            def gather(indices):
                batch = tf.numpy_function(self.images.__getitem__, [indices], tf.uint8, stateful=False)
                return tf.ensure_shape(batch, [None, *self.images.shape[1:]])
        else:
            images = tf.constant(self.images)

            def gather(indices):
                return tf.gather(images, indices)

        def this_epochs_batches():  # the plan is read when an epoch's iteration starts
            for index in range(len(self)):
                yield self.plan.batch(index, self.batch_size, self.process_shard)

        plans = tf.data.Dataset.from_generator(this_epochs_batches, output_signature=(
            tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, 2], tf.int32), tf.TensorSpec([None], tf.bool),
        ))

        def batch_of(indices, offsets, flips):
            return self.make_batch(gather(indices), tf.gather(labels, indices), offsets, flips, xp=tnp)

        batches = plans.map(batch_of, num_parallel_calls=tf.data.AUTOTUNE)
        # Known length: Keras then makes one pass per epoch, with no "ran out of data" warning.
        return batches.apply(tf.data.experimental.assert_cardinality(len(self))).prefetch(tf.data.AUTOTUNE)


class EpochSetter(keras.callbacks.Callback):
    """Tells the training `Batches` which epoch starts (also after a resume)."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.set_epoch(epoch)
