"""Rotations: RotNet's pretext task, and the augmentation that keeps its labels true.

The idea of RotNet in one function: `four_rotations` turns a batch of B
images into 4B images, every image as its four exact `rot90` copies, with
the number of quarter turns (0-3) as its label. All four copies of an image
are in the same batch, as in the paper. To tell them apart the network must
know which way is up: where the sky is, which way eyes and wheels face.

Augmentation (pad-4-and-crop, horizontal flip) is applied once per image
*before* rotating, so the rotation label stays true: a horizontally flipped
upright image is still upright. (A vertical flip would not be: it equals a
180-degree turn of the horizontal flip, and would contradict the label.)

Both functions are written against the NumPy API, with the array module
as an argument: `keras.ops` (the default) runs them on the current
backend's device, `tensorflow.experimental.numpy` inside a tf.data
pipeline (`kerasrot.pipeline`). One definition, two places to run it.
"""

from keras import ops

NUM_ROTATIONS = 4
CROP_PADDING = 4


def four_rotations(images, xp=ops):
    """`[B, H, W, C]` images -> their `[4B, H, W, C]` quarter turns and labels 0-3.

    Turns are counter-clockwise (`np.rot90`); copy k of every image is at
    rows `k*B .. (k+1)*B - 1`, with label k.
    """
    rotated = [xp.rot90(images, k=k, axes=(1, 2)) for k in range(NUM_ROTATIONS)]
    labels = [xp.full_like(images[:, 0, 0, 0], k, dtype="int32") for k in range(NUM_ROTATIONS)]
    return xp.concatenate(rotated, axis=0), xp.concatenate(labels, axis=0)


def crop_and_flip(images, offsets, flips, xp=ops):
    """Pads by `CROP_PADDING`, crops each image at its own `(dy, dx)` and flips some.

    `offsets` is `[B, 2]` int32 in `[0, 2 * CROP_PADDING]`, `flips` is `[B]`
    booleans. Each image's crop is a gather of its own rows, then of its own
    columns; a horizontal flip is the same columns in reverse order, so it
    costs nothing. Exact, vectorised, and the same on every backend.
    """
    height, width = images.shape[1], images.shape[2]
    p = CROP_PADDING
    padded = xp.pad(images, [[0, 0], [p, p], [p, p], [0, 0]], mode="constant")
    rows = offsets[:, :1] + xp.arange(height, dtype="int32")[None, :]  # [B, H]
    cols = offsets[:, 1:] + xp.arange(width, dtype="int32")[None, :]  # [B, W]
    cols = xp.where(flips[:, None], xp.flip(cols, axis=1), cols)
    cropped = xp.take_along_axis(padded, rows[:, :, None, None], axis=1)
    return xp.take_along_axis(cropped, cols[:, None, :, None], axis=2)
