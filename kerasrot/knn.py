"""kNN monitor: does a better pretext score mean better features?

Rotation accuracy says how well a network predicts rotations, not how
useful its features are for anything else. `KnnMonitor` watches the second
question while the first one trains, as solo-learn and lightly do: after
every epoch it classifies a fixed set of labelled test images by their k
nearest neighbours among a fixed labelled training subset, in the feature
space of one block. A rotation accuracy that keeps rising while the kNN
accuracy of a middle block stalls or falls says the late blocks are
specialising in rotations (RotNet's Table 1, seen epoch by epoch).

The rule is solo-learn's weighted kNN (Wu et al. 2018): features are the
block's output averaged over space, compared by cosine similarity; the
k = 20 most similar training images vote for their labels, each vote
weighted by exp(similarity / T) with T = 0.07, so close neighbours count
far more than distant ones. Nothing is trained: no probe, no labels seen
by the network.

Its cost is two forward passes per epoch, one over the training subset and
one over the test images, in inference mode and forward only, plus a
similarity matrix computed a block of test images at a time.
"""

import time

import keras
import numpy as np
from keras import layers

from kerasrot.models import data_format_of
from kerasrot.probes import block_outputs

MAX_SIMILARITIES = 1_000 * 50_000  # per block of test images: 200 MB of float32


def normalized(features):
    """Each row scaled to unit length, so a dot product is a cosine similarity."""
    features = np.asarray(features, "float32")
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def knn_predict(train_features, train_labels, test_features, k=20, temperature=0.07, num_classes=None):
    """The label of each test feature by a weighted vote of its `k` most similar (cosine) training features."""
    train, test = normalized(train_features), normalized(test_features)
    train_labels = np.asarray(train_labels).reshape(-1).astype("int64")
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train))
    rows = max(1, MAX_SIMILARITIES // len(train))  # bounds the memory, whatever the number of test images
    predictions = [np.zeros(0, "int64")]
    for start in range(0, len(test), rows):
        similarity = test[start:start + rows] @ train.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        nearest_similarity = np.take_along_axis(similarity, nearest, axis=1)
        # Subtracting each row's largest similarity scales its votes by one
        # constant, which leaves the winner alone and keeps exp() finite for any T.
        weights = np.exp((nearest_similarity - nearest_similarity.max(axis=1, keepdims=True)) / temperature)
        votes = np.zeros((len(nearest), num_classes))
        np.add.at(votes, (np.arange(len(nearest))[:, None], train_labels[nearest]), weights)
        predictions.append(votes.argmax(axis=1))
    return np.concatenate(predictions)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07, num_classes=None):
    """The fraction of test features whose kNN prediction (`knn_predict`) is their label."""
    predicted = knn_predict(train_features, train_labels, test_features, k, temperature, num_classes)
    return float(np.mean(predicted == np.asarray(test_labels).reshape(-1)))


def feature_model(model, block, data_format=None):
    """A model from `model`'s images to `block`'s output averaged over space: `[N, channels]`.

    It shares `model`'s layers, so it always computes with the current
    weights. It is not marked frozen: `trainable = False` on a model sets it
    on every layer inside, which here are the layers of `model`, and would
    freeze the network being trained. Inference mode comes from running it
    with `training=False` instead (`pooled_features`).
    """
    features = block_outputs(model, [block])[block]
    # float32 pooling: a mixed-precision model's mean stays exact enough to rank neighbours.
    pool = layers.GlobalAveragePooling2D(data_format=data_format or data_format_of(model), dtype="float32",
                                         name=f"knn_{block}_pool")
    return keras.Model(model.input, pool(features), name=f"{model.name}_{block}_features")


def pooled_features(extractor, images, batch_size=256):
    """`extractor`'s outputs for `images` (uint8 or float `[N, S, S, 3]`) as float32, one batch at a time.

    `predict_on_batch` calls the model with `training=False`: BatchNorm uses
    and keeps its moving statistics, and no gradients are recorded.
    """
    batches = (np.asarray(images[np.arange(start, min(start + batch_size, len(images)))], "float32")
               for start in range(0, len(images), batch_size))  # indices: arrays and streamed `ImageFiles` alike
    return np.concatenate([np.asarray(extractor.predict_on_batch(batch), "float32") for batch in batches])


class KnnMonitor(keras.callbacks.Callback):
    """Adds `knn_accuracy` (a fraction, like `val_accuracy`) and its `knn_seconds` to every epoch's logs.

    Place it before `keras.callbacks.CSVLogger` so the history records it.
    It reads the model and changes nothing: no weights, BatchNorm
    statistics or optimizer state, and it draws no random numbers.

    Args:
        block: the block whose pooled output is the feature ("layer2", ...).
        train_images, train_labels: the labelled subset the neighbours come from.
        test_images, test_labels: the images classified and scored.
        k, temperature: the vote (`knn_predict`).
        batch_size: images per forward pass.
    """

    def __init__(self, block, train_images, train_labels, test_images, test_labels, k=20, temperature=0.07,
                 batch_size=256):
        super().__init__()
        self.block, self.k, self.temperature, self.batch_size = block, k, temperature, batch_size
        self.train_images, self.train_labels = train_images, np.asarray(train_labels).reshape(-1)
        self.test_images, self.test_labels = test_images, np.asarray(test_labels).reshape(-1)
        self.extractor = None

    def on_train_begin(self, logs=None):
        self.extractor = feature_model(self.model, self.block)  # once: it follows the weights by itself

    def on_epoch_end(self, epoch, logs=None):
        # By now `fit` has put the epoch's weights into the model's variables (on JAX as well).
        start = time.perf_counter()
        train = pooled_features(self.extractor, self.train_images, self.batch_size)
        test = pooled_features(self.extractor, self.test_images, self.batch_size)
        logs["knn_accuracy"] = knn_accuracy(train, self.train_labels, test, self.test_labels, self.k,
                                            self.temperature)
        logs["knn_seconds"] = round(time.perf_counter() - start, 2)  # what watching costs
