import importlib.util

import keras
import numpy as np
import pytest

from kerasrot import data, models, training
from kerasrot.pipeline import Batches, EpochSetter
from kerasrot.rotations import CROP_PADDING, crop_and_flip, four_rotations
from tests import test_training


def as_numpy(x):
    return keras.ops.convert_to_numpy(x)


def tensors(*arrays):
    return [keras.ops.convert_to_tensor(a) for a in arrays]


def test_rotated_copy_is_rot90_of_original_with_label_k():
    images = np.random.default_rng(0).integers(0, 255, size=(3, 8, 8, 3)).astype("float32")
    rotated, labels = four_rotations(*tensors(images))
    rotated, labels = as_numpy(rotated), as_numpy(labels)
    assert rotated.shape == (12, 8, 8, 3)
    for k in range(4):
        for i in range(3):
            np.testing.assert_array_equal(rotated[k * 3 + i], np.rot90(images[i], k, axes=(0, 1)))
            assert labels[k * 3 + i] == k


def test_crop_and_flip_matches_numpy_slicing():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (6, 32, 32, 3)).astype("float32")
    offsets = rng.integers(0, 2 * CROP_PADDING + 1, (6, 2)).astype("int32")
    offsets[0] = CROP_PADDING  # the centre crop: the image itself
    flips = np.array([False, False, True, False, False, True])
    ours = as_numpy(crop_and_flip(*tensors(images, offsets, flips)))
    np.testing.assert_array_equal(ours[0], images[0])
    padded = np.pad(images, ((0, 0), (CROP_PADDING,) * 2, (CROP_PADDING,) * 2, (0, 0)))
    for i, (dy, dx) in enumerate(offsets):
        expected = padded[i, dy : dy + 32, dx : dx + 32]
        if flips[i]:
            expected = expected[:, ::-1]
        np.testing.assert_array_equal(ours[i], expected)


def test_crop_shifts_image_and_fills_with_zeros():
    images = np.ones((1, 8, 8, 1), dtype="float32")
    offsets = np.array([[0, CROP_PADDING]], dtype="int32")
    shifted = as_numpy(crop_and_flip(*tensors(images, offsets, np.array([False]))))
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
        images, rot = (as_numpy(t) for t in batches[i])
        quarter = len(rot) // 4
        first = images[:quarter]
        for k in range(4):  # the same images, in the same order, in each quarter of the batch
            np.testing.assert_array_equal(images[k * quarter:(k + 1) * quarter], np.rot90(first, k, axes=(1, 2)))
            assert (rot[k * quarter:(k + 1) * quarter] == k).all()
        ids.append(first[:, 0, 0, 0])
        labels.append(rot)
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


def test_batches_depend_on_seed_and_epoch_only():
    images = np.random.default_rng(0).integers(0, 255, size=(20, 8, 8, 3)).astype("uint8")

    def first_batch(seed, epoch):
        batches = Batches(images, np.zeros(20), 20, augment=True, shuffle=True, seed=seed)
        batches.set_epoch(epoch)
        return as_numpy(batches[0][0])

    np.testing.assert_array_equal(first_batch(5, 1), first_batch(5, 1))  # what a resumed run relies on
    assert not np.array_equal(first_batch(5, 1), first_batch(5, 0))
    assert not np.array_equal(first_batch(6, 1), first_batch(5, 1))
    unshuffled = Batches(_identity_images(20), np.zeros(20), 20)
    assert as_numpy(unshuffled[0][0])[:, 0, 0, 0].astype(int).tolist() == list(range(20))


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("rotations", [False, True])
def test_memory_and_tfdata_pipelines_yield_the_same_batches(augment, rotations):
    pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(11, 8, 8, 3)).astype("uint8")
    labels = rng.integers(0, 10, size=11)
    batches = Batches(images, labels, 4, rotations=rotations, augment=augment, shuffle=True, seed=7)
    dataset = batches.as_tf_dataset()
    for epoch in (0, 1):
        batches.set_epoch(epoch)
        from_tfdata = list(dataset.as_numpy_iterator())
        assert len(from_tfdata) == len(batches)
        for i, (x, y) in enumerate(from_tfdata):
            np.testing.assert_array_equal(as_numpy(batches[i][0]), x)
            np.testing.assert_array_equal(as_numpy(batches[i][1]), y)


def test_both_pipelines_train_a_model_alike_inside_fit_epoch_after_epoch(tmp_path):
    """Guards the epoch plan in `fit`: the tf.data pipeline must read each epoch's plan after EpochSetter."""
    pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(24, 32, 32, 3)).astype("uint8")
    settings = {**test_training.SETTINGS, "epochs": 3, "learning_rate": 0.02, "schedule": "constant",
                "nesterov": False, "weight_decay": 0.0}
    keras.utils.set_random_seed(0)
    start = models.build_model("resnet18", 4, stem="imagenet").get_weights()
    trained = {}
    for pipeline in ("memory", "tfdata"):
        model = models.build_model("resnet18", 4, stem="imagenet")
        model.set_weights(start)
        training.compile_model(model, settings, steps_per_epoch=3)
        batches = Batches(images, np.zeros(24), 8, rotations=True, augment=True, shuffle=True, seed=1)
        fit_data = batches if pipeline == "memory" else batches.as_tf_dataset()
        model.fit(fit_data, epochs=3, shuffle=False, callbacks=[EpochSetter(batches)], verbose=0)
        trained[pipeline] = model.get_weights()
    for a, b in zip(trained["memory"], trained["tfdata"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


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


def test_each_process_of_several_yields_its_share_of_every_batch():
    """`--data-parallel` on several machines: the processes' shares make up the one-machine batch."""
    images = _identity_images(22)
    kwargs = dict(batch_size=8, rotations=True, augment=True, shuffle=True, seed=5, epoch_length=20)
    whole = Batches(images, np.zeros(22), **kwargs)
    shares = [Batches(images, np.zeros(22), process_shard=(p, 2), **kwargs) for p in (0, 1)]
    assert len(shares[0]) == len(whole) == 3  # 8 + 8 + 4 images
    for i in range(len(whole)):
        expected = as_numpy(whole[i][0])
        first, second = (as_numpy(share[i][0]) for share in shares)
        n = len(expected) // 4  # images in the batch; each share holds half of them, four turns each
        for k in range(4):  # rotation k of the batch's images is rows k*n .. (k+1)*n - 1
            np.testing.assert_array_equal(np.concatenate([first[k * n // 2:(k + 1) * n // 2],
                                                          second[k * n // 2:(k + 1) * n // 2]]),
                                          expected[k * n:(k + 1) * n])
    if importlib.util.find_spec("tensorflow"):  # the tf.data pipeline takes the same shares
        for share in shares:
            for i, (x, _) in enumerate(share.as_tf_dataset().as_numpy_iterator()):
                np.testing.assert_array_equal(as_numpy(share[i][0]), x)
