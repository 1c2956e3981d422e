"""kNN monitor: the weighted cosine vote, and a callback that logs it each epoch without changing the model."""

import csv
import random

import keras
import numpy as np
import pytest
from keras import layers

from kerasrot import knn, models


def tiny_model():
    """A small functional model named by blocks, as kerasrot.models names them."""
    inputs = keras.Input((8, 8, 3), name="images")
    x = layers.Conv2D(8, 3, padding="same", name="stem_conv")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    x = layers.Conv2D(16, 3, padding="same", name="layer1_conv")(x)
    x = layers.ReLU(name="layer1_relu")(x)
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    outputs = layers.Dense(4, name="head_logits")(x)
    return keras.Model(inputs, outputs, name="tiny")


def tinted_images(n, seed):
    """uint8 noise tinted by class (one of three channels), and the classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = rng.integers(0, 120, (n, 8, 8, 3))
    images[np.arange(n), :, :, labels] += 120
    return images.astype("uint8"), labels


def as_numpy(x):
    return np.array(keras.ops.convert_to_numpy(x))


def monitor_for(seed=0):
    train_images, train_labels = tinted_images(24, seed)
    test_images, test_labels = tinted_images(9, seed + 1)
    return knn.KnnMonitor("layer1", train_images, train_labels, test_images, test_labels, k=5, batch_size=8)


def test_knn_accuracy_is_one_on_clusters_around_distinct_directions():
    rng = np.random.default_rng(0)
    directions = np.eye(8)[:4]
    labels = np.arange(40) % 4
    # lengths from 0.1 to 10: only the direction tells the classes apart
    features = (directions[labels] + 0.05 * rng.normal(size=(40, 8))) * rng.uniform(0.1, 10, (40, 1))
    assert knn.knn_accuracy(features[:30], labels[:30], features[30:], labels[30:], k=5) == 1.0


def test_k1_predicts_the_label_of_the_most_similar_training_feature_by_cosine_not_distance():
    train = np.array([[10.0, 0.0], [0.5, 0.6]])
    # a short copy of the first lies nearer the second; a long copy of the second nearer the first
    test = np.array([0.05 * train[0], 20 * train[1]])
    assert knn.knn_predict(train, [0, 1], test, k=1).tolist() == [0, 1]


def test_a_close_neighbour_outvotes_two_distant_ones_at_a_low_temperature():
    angle = np.pi / 3
    train = np.array([[1.0, 0.0], [np.cos(angle), np.sin(angle)], [np.cos(angle), np.sin(angle) + 0.01]])
    test = np.array([[1.0, 0.05]])
    assert knn.knn_predict(train, [0, 1, 1], test, k=3, temperature=0.07).tolist() == [0]
    assert knn.knn_predict(train, [0, 1, 1], test, k=3, temperature=100.0).tolist() == [1]  # nearly a majority vote


def test_predictions_do_not_depend_on_how_many_test_features_are_compared_at_once(monkeypatch):
    rng = np.random.default_rng(1)
    train, test, labels = rng.normal(size=(50, 6)), rng.normal(size=(23, 6)), rng.integers(0, 5, 50)
    all_at_once = knn.knn_predict(train, labels, test, k=7)
    monkeypatch.setattr(knn, "MAX_SIMILARITIES", 50 * 4)  # 4 test features at a time
    np.testing.assert_array_equal(knn.knn_predict(train, labels, test, k=7), all_at_once)


def test_monitor_logs_knn_accuracy_of_every_epoch_in_the_csv(tmp_path):
    keras.utils.set_random_seed(0)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    images, _ = tinted_images(32, seed=2)
    rotations = np.arange(32) % 4
    monitor = monitor_for()
    model.fit(images.astype("float32"), rotations, epochs=2, batch_size=8, verbose=0,
              callbacks=[monitor, keras.callbacks.CSVLogger(str(tmp_path / "history.csv"))])
    with open(tmp_path / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == [0, 1]
    assert all(0.0 <= float(row["knn_accuracy"]) <= 1.0 for row in rows)
    # the last epoch's score is that of the weights fit ended with
    train = knn.pooled_features(monitor.extractor, monitor.train_images)
    test = knn.pooled_features(monitor.extractor, monitor.test_images)
    final = knn.knn_accuracy(train, monitor.train_labels, test, monitor.test_labels, k=5)
    assert float(rows[-1]["knn_accuracy"]) == pytest.approx(final)


def test_monitor_leaves_weights_batchnorm_statistics_and_optimizer_state_unchanged():
    keras.utils.set_random_seed(0)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    images, _ = tinted_images(8, seed=3)
    model.train_on_batch(images.astype("float32"), np.arange(8) % 4)  # builds the optimizer: momentum, iterations
    rng = np.random.default_rng(4)
    for weight in model.weights:  # moving means and variances too (positive, not the initial 0 and 1)
        weight.assign(rng.uniform(0.5, 1.5, weight.shape).astype("float32"))
    weights = [as_numpy(w) for w in model.weights]
    optimizer = [as_numpy(v) for v in model.optimizer.variables]
    trainable = [layer.trainable for layer in model.layers]
    numpy_state, python_state = np.random.get_state(), random.getstate()

    monitor, logs = monitor_for(), {}
    monitor.set_model(model)
    monitor.on_train_begin()
    monitor.on_epoch_end(0, logs)

    assert 0.0 <= logs["knn_accuracy"] <= 1.0
    for weight, before in zip(model.weights, weights):
        np.testing.assert_array_equal(as_numpy(weight), before, err_msg=weight.path)
    for variable, before in zip(model.optimizer.variables, optimizer):
        np.testing.assert_array_equal(as_numpy(variable), before, err_msg=variable.path)
    assert [layer.trainable for layer in model.layers] == trainable  # the feature model froze nothing
    assert random.getstate() == python_state
    np.testing.assert_array_equal(np.random.get_state()[1], numpy_state[1])


def test_feature_model_follows_the_models_current_weights():
    keras.utils.set_random_seed(0)
    model = tiny_model()
    extractor = knn.feature_model(model, "layer1")
    kernel = model.get_layer("layer1_conv").kernel
    kernel.assign(2 * as_numpy(kernel))
    images, _ = tinted_images(5, seed=5)
    block = keras.Model(model.input, model.get_layer("layer1_relu").output)
    expected = as_numpy(block.predict_on_batch(images.astype("float32"))).mean(axis=(1, 2))
    np.testing.assert_allclose(knn.pooled_features(extractor, images, batch_size=2), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="NCHW convolutions run on the CPU with torch only")
def test_channels_first_feature_model_pools_each_channel_of_the_block():
    keras.utils.set_random_seed(0)
    first = models.resnet18(4, stem="imagenet", data_format="channels_first")
    last = models.resnet18(4, stem="imagenet")
    models.transfer_weights(first, last, skip_blocks=())
    assert (knn.data_format_of(first), knn.data_format_of(last)) == ("channels_first", "channels_last")
    extractor = knn.feature_model(first, "layer1")
    assert extractor.output_shape == (None, 64)  # not the width of the 8x8 map
    images = np.random.default_rng(6).integers(0, 255, (3, 32, 32, 3)).astype("uint8")
    features = knn.pooled_features(extractor, images)
    assert features.shape == (3, 64) and features.dtype == np.float32
    np.testing.assert_allclose(features, knn.pooled_features(knn.feature_model(last, "layer1"), images),
                               rtol=1e-4, atol=1e-4)
