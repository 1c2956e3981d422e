import keras
import numpy as np
import pytest

from kerasrot import data
from kerasrot.pipeline import CROP_PADDING, Batches, crop_and_flip, four_rotations


def as_numpy(x):
    return keras.ops.convert_to_numpy(x)


def test_rotated_copy_is_rot90_of_original_with_label_k():
    images = np.random.default_rng(0).integers(0, 255, size=(3, 8, 8, 3)).astype("float32")
    rotated, labels = four_rotations(keras.ops.convert_to_tensor(images))
    rotated, labels = as_numpy(rotated), as_numpy(labels)
    assert rotated.shape == (12, 8, 8, 3)
    for k in range(4):
        for i in range(3):
            np.testing.assert_array_equal(rotated[k * 3 + i], np.rot90(images[i], k, axes=(0, 1)))
            assert labels[k * 3 + i] == k


def test_crop_at_padding_offset_without_flip_is_identity_and_flip_mirrors():
    images = np.random.default_rng(1).integers(0, 255, size=(2, 8, 8, 3)).astype("float32")
    offsets = np.full((2, 2), CROP_PADDING, dtype="int32")
    same = crop_and_flip(images, offsets, np.array([False, False]))
    np.testing.assert_array_equal(as_numpy(same), images)
    flipped = as_numpy(crop_and_flip(images, offsets, np.array([True, False])))
    np.testing.assert_array_equal(flipped[0], images[0][:, ::-1])
    np.testing.assert_array_equal(flipped[1], images[1])


def test_crop_and_flip_matches_numpy_slicing():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (6, 32, 32, 3)).astype("float32")
    offsets = rng.integers(0, 2 * CROP_PADDING + 1, (6, 2))
    flips = np.array([True, False, True, False, False, True])
    ours = keras.ops.convert_to_numpy(crop_and_flip(images, offsets, flips))
    padded = np.pad(images, ((0, 0), (CROP_PADDING,) * 2, (CROP_PADDING,) * 2, (0, 0)))
    for i, (dy, dx) in enumerate(offsets):
        expected = padded[i, dy : dy + 32, dx : dx + 32]
        if flips[i]:
            expected = expected[:, ::-1]
        np.testing.assert_array_equal(ours[i], expected)


def test_crop_shifts_image_and_fills_with_zeros():
    images = np.ones((1, 8, 8, 1), dtype="float32")
    shifted = as_numpy(crop_and_flip(images, np.array([[0, CROP_PADDING]], dtype="int32"), np.array([False])))
    assert shifted[0, :CROP_PADDING].sum() == 0  # rows taken from the top padding
    assert shifted[0, CROP_PADDING:].min() == 1


def _identity_images(n):
    """Images whose first pixel holds their index, so batches can be traced back."""
    images = np.zeros((n, 8, 8, 3), dtype="uint8")
    images[:, 0, 0, 0] = np.arange(n)
    return images


@pytest.mark.parametrize("n,batch_size", [(10, 4), (8, 4), (7, 16)])
def test_every_image_appears_exactly_once_per_epoch(n, batch_size):
    labels = np.arange(n) % 3
    batches = Batches(_identity_images(n), labels, batch_size, shuffle=True, seed=3)
    assert len(batches) == -(-n // batch_size)
    for epoch in (0, 1):
        batches.set_epoch(epoch)
        seen = [batches[i] for i in range(len(batches))]
        ids = np.concatenate([as_numpy(x)[:, 0, 0, 0] for x, _ in seen]).astype(int)
        assert sorted(ids.tolist()) == list(range(n))
        # labels travel with their images
        np.testing.assert_array_equal(np.concatenate([as_numpy(y) for _, y in seen]), labels[ids])
    with pytest.raises(IndexError):
        batches[len(batches)]


def test_rotation_batches_hold_four_copies_of_each_image_with_balanced_labels():
    batches = Batches(_identity_images(10), np.zeros(10), 4, rotations=True, shuffle=True)
    ids, labels = [], []
    for i in range(len(batches)):
        images, rot = batches[i]
        ids.append(as_numpy(images)[:, 0, 0, 0])
        labels.append(as_numpy(rot))
        # the same images, in the same order, in each quarter of the batch
        images, rot = as_numpy(images), as_numpy(rot)
        quarter = len(rot) // 4
        first = images[:quarter]
        for k in range(4):
            np.testing.assert_array_equal(images[k * quarter:(k + 1) * quarter], np.rot90(first, k, axes=(1, 2)))
            assert (rot[k * quarter:(k + 1) * quarter] == k).all()
        ids[-1] = first[:, 0, 0, 0]
    labels = np.concatenate(labels)
    assert [len(b) for b in ids] == [4, 4, 2]  # the last, partial batch is kept
    assert sorted(np.concatenate(ids).astype(int).tolist()) == list(range(10))
    assert batches.num_samples == 40 == len(labels)
    assert np.bincount(labels).tolist() == [10, 10, 10, 10]


def test_epoch_length_repeats_small_subsets_without_duplicates_within_a_pass():
    batches = Batches(_identity_images(5), np.zeros(5), 5, shuffle=True, epoch_length=15)
    ids = np.concatenate([as_numpy(batches[i][0])[:, 0, 0, 0] for i in range(len(batches))]).astype(int)
    assert len(ids) == 15
    for p in range(3):
        assert sorted(ids[5 * p:5 * p + 5].tolist()) == [0, 1, 2, 3, 4]
    assert len(set(tuple(ids[5 * p:5 * p + 5]) for p in range(3))) > 1  # a fresh order each pass


def test_epoch_length_that_is_not_a_multiple_truncates_the_last_pass():
    batches = Batches(_identity_images(5), np.zeros(5), 4, shuffle=True, epoch_length=12, rotations=True)
    assert len(batches) == 3 and batches.num_samples == 48
    ids = np.concatenate([as_numpy(batches[i][0])[:len(as_numpy(batches[i][1])) // 4, 0, 0, 0]
                          for i in range(len(batches))]).astype(int)
    assert len(ids) == 12
    assert sorted(ids[:5].tolist()) == sorted(ids[5:10].tolist()) == [0, 1, 2, 3, 4]
    assert len(set(ids[10:].tolist())) == 2


def test_same_seed_and_epoch_give_same_batches_and_next_epoch_reshuffles():
    images = np.random.default_rng(0).integers(0, 255, size=(20, 8, 8, 3)).astype("uint8")
    a = Batches(images, np.zeros(20), 20, augment=True, shuffle=True, seed=5)
    b = Batches(images, np.zeros(20), 20, augment=True, shuffle=True, seed=5)
    np.testing.assert_array_equal(as_numpy(a[0][0]), as_numpy(b[0][0]))
    b.set_epoch(1)
    assert not np.array_equal(as_numpy(a[0][0]), as_numpy(b[0][0]))
    b.set_epoch(0)  # back to epoch 0: the same batch again (what a resumed run relies on)
    np.testing.assert_array_equal(as_numpy(a[0][0]), as_numpy(b[0][0]))


def test_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        batches = Batches(_identity_images(20), np.zeros(20), 20, shuffle=True, seed=seed)
        batches.set_epoch(epoch)
        return as_numpy(batches[0][0])[:, 0, 0, 0].astype(int).tolist()

    assert order(5, 0) == order(5, 0)
    assert order(5, 1) != order(5, 0)
    assert order(6, 0) != order(5, 0)
    unshuffled = Batches(_identity_images(20), np.zeros(20), 20, shuffle=False)
    assert as_numpy(unshuffled[0][0])[:, 0, 0, 0].astype(int).tolist() == list(range(20))


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("rotations", [False, True])
def test_memory_and_tfdata_pipelines_yield_the_same_batches(augment, rotations):
    pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(11, 8, 8, 3)).astype("uint8")
    labels = rng.integers(0, 10, size=11)
    kwargs = dict(batch_size=4, rotations=rotations, augment=augment, shuffle=True, seed=7)
    memory = Batches(images, labels, pipeline="memory", **kwargs)
    tfdata = Batches(images, labels, pipeline="tfdata", **kwargs)
    for epoch in (0, 1):
        memory.set_epoch(epoch)
        tfdata.set_epoch(epoch)
        for i in range(len(memory)):
            (x1, y1), (x2, y2) = memory[i], tfdata[i]
            np.testing.assert_array_equal(as_numpy(x1), as_numpy(x2))
            np.testing.assert_array_equal(as_numpy(y1), as_numpy(y2))


def test_balanced_subset_takes_n_per_class_sorted_and_fixed_by_seed():
    labels = np.repeat(np.arange(4), 10)
    chosen = data.balanced_subset(labels, 3, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [3, 3, 3, 3]
    assert chosen.tolist() == sorted(chosen.tolist())
    assert chosen.tolist() == data.balanced_subset(labels, 3, seed=0).tolist()
    assert chosen.tolist() != data.balanced_subset(labels, 3, seed=1).tolist()
    assert len(data.balanced_subset(labels, None, seed=0)) == 40
    with pytest.raises(data.DataError, match="asked for 11"):
        data.balanced_subset(labels, 11, seed=0)
