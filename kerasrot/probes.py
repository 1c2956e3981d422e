"""Probes: which block of a network holds the features that tell the classes apart?

RotNet's central analysis (Gidaris et al. 2018, Table 1): freeze a network,
take the output of one block, and train a small classifier on it with the
labels. The better that classifier does, the more useful the block's
features. For a rotation model the answer is not "the last block": it
specialises in rotations, and a middle block generalises best.

The backbone is frozen, so its features never change: `block_features`
computes every block's features once per split (one pass over the images,
BatchNorm in inference mode), and the probes train on those arrays, which
costs seconds instead of a pass through the backbone every epoch. To keep
them small at any image size, each block's output is average-pooled to at
most 2x2 cells: `[N, cells, channels]` (at most 50,000 x 4 x 512 floats per
block, 0.8 GB for all five on the whole of CIFAR-10 with the CIFAR stem).

Two probes, on the same features:
* `linear`: global average pooling (the mean of the cells), then a linear
  layer: what the block's channels say about the class.
* `nonlinear`: a hidden layer of 512 units (BatchNorm, ReLU) on the 2x2
  cells, in the spirit of the paper's non-linear classifier (fully
  connected layers on frozen features). It also sees where in the image a
  feature fires, which averaging throws away.
Both first standardise each feature (BatchNorm without scale or offset):
block outputs differ in scale by orders of magnitude, and standardised
inputs let one learning rate suit every block. At inference this is a
fixed affine map, so the linear probe stays linear.
"""

import keras
from keras import layers

from kerasrot.frozen import frozen_outputs
from kerasrot.models import block_of

PROBED_BLOCKS = ("stem", "layer1", "layer2", "layer3", "layer4")
PROBES = ("linear", "nonlinear")
HIDDEN_UNITS = 512


def block_outputs(model, blocks=PROBED_BLOCKS):
    """Each block's output tensor: that of its last layer (the layers are in the order data flows)."""
    last = {}
    for layer in model.layers:
        last[block_of(layer.name)] = layer
    return {block: last[block].output for block in blocks}


def feature_extractor(model, blocks=PROBED_BLOCKS):
    """A model from images to every block's output, average-pooled to at most 2x2 cells: `[N, cells, C]`.

    `model` must be channels_last (as the saved models are).
    """
    outputs = {}
    for block, x in block_outputs(model, blocks).items():
        size = x.shape[1]
        if size > 2:
            x = layers.AveragePooling2D(size // 2, name=f"probe_{block}_pool")(x)
        outputs[block] = layers.Reshape((-1, x.shape[-1]), name=f"probe_{block}_cells")(x)
    extractor = keras.Model(model.input, outputs, name=f"{model.name}_features")
    extractor.trainable = False  # frozen: BatchNorm in inference mode, weights untouched
    return extractor


def block_features(model, batches, blocks=PROBED_BLOCKS, on_batch=None):
    """`{block: float32 array [N, cells, C]}` and the labels, for every image of `batches` (in order)."""
    return frozen_outputs(feature_extractor(model, blocks), batches, on_batch)


def probe(kind, cells, channels, num_classes, name=None):
    """A probe: a `linear` or `nonlinear` classifier on one block's `[cells, channels]` features."""
    if kind not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {kind!r}")
    inputs = keras.Input((cells, channels), name="features")
    if kind == "linear":
        x = layers.GlobalAveragePooling1D(name="probe_pool")(inputs)
        x = layers.BatchNormalization(center=False, scale=False, name="probe_standardize")(x)
    else:
        x = layers.Flatten(name="probe_flatten")(inputs)
        x = layers.BatchNormalization(center=False, scale=False, name="probe_standardize")(x)
        x = layers.Dense(HIDDEN_UNITS, use_bias=False, name="probe_hidden")(x)
        x = layers.BatchNormalization(name="probe_hidden_bn")(x)
        x = layers.ReLU(name="probe_hidden_relu")(x)
    outputs = layers.Dense(num_classes, name="probe_logits")(x)
    return keras.Model(inputs, outputs, name=name or f"{kind}_probe")
