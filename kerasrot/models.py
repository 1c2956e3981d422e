"""Models: ResNet18 and DenseNet121 as Keras functional models with named blocks.

Every layer name starts with the block it belongs to, in the order the data
flows: `preprocess`, `stem`, `layer1` .. `layer4`, `head`. That one convention
makes three things trivial:

* freezing by block (`set_trainable(model, "last_block")` freezes every layer
  whose name does not start with `layer4` or `head`);
* swapping the head (`transfer_weights` copies every non-`head` layer by name);
* reading `model.summary()`.

The models take float images in [0, 255], NHWC, and normalise them inside the
network, so a saved `.keras` file is all one needs to evaluate it.

Two arguments change how a model computes, never what, as in keras-hub's
backbones: `data_format` ("channels_first" is faster on the PyTorch backend,
which convolves NCHW) and `dtype` (a dtype policy such as "mixed_bfloat16").
Their defaults are Keras' own; `kerasrot.runner.speed` picks faster ones.

Example:

    rotnet = resnet18(num_classes=4)                   # predicts the rotation
    classifier = resnet18(num_classes=10)              # predicts the class
    transfer_weights(rotnet, classifier)               # all but the head
    set_trainable(classifier, "last_block")            # layer4 + head train
"""

import keras
from keras import layers

BLOCKS = ("preprocess", "stem", "layer1", "layer2", "layer3", "layer4", "head")
TRAINABLE_CHOICES = {
    "all": BLOCKS,
    "last_block": ("layer4", "head"),
    "head": ("head",),
}
STEMS = ("cifar", "imagenet")
DATA_FORMATS = ("channels_last", "channels_first")

# Per-channel statistics of the CIFAR-10 training set, on the 0-255 scale.
# Used for every dataset: the models see images normalised the same way
# whatever they were pretrained on, so weights transfer between datasets.
CIFAR10_MEAN = (125.3, 123.0, 113.9)
CIFAR10_STD = (63.0, 62.1, 66.7)

BN_EPSILON = 1.001e-5  # as keras.applications; torchvision uses 1e-5
BN_MOMENTUM = 0.9  # Keras' momentum is 1 - PyTorch's (0.1)


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------


def channel_axis(data_format):
    return 1 if data_format == "channels_first" else -1


def preprocess(x, data_format, dtype, name="preprocess"):
    """Scales 0-255 NHWC images to zero mean and unit variance per channel.

    Inputs are always NHWC. A `channels_first` network transposes them to
    NCHW here, once, instead of inside every convolution.
    """
    variance = [s * s for s in CIFAR10_STD]
    x = layers.Normalization(mean=list(CIFAR10_MEAN), variance=variance, dtype=dtype, name=f"{name}_normalize")(x)
    if data_format == "channels_first":
        x = layers.Permute((3, 1, 2), dtype=dtype, name=f"{name}_to_channels_first")(x)
    return x


def batch_norm(x, data_format, dtype, name):
    return layers.BatchNormalization(
        axis=channel_axis(data_format), epsilon=BN_EPSILON, momentum=BN_MOMENTUM, dtype=dtype, name=name
    )(x)


def conv(x, filters, kernel_size, data_format, dtype, strides=1, name=None):
    """A bias-free convolution padded like PyTorch (symmetric, `k // 2`).

    Keras' `padding="same"` pads stride-2 convolutions asymmetrically, so we
    pad explicitly and convolve with `padding="valid"`, as
    `keras.applications.resnet` does; weights then match torchvision's layout.
    """
    pad = kernel_size // 2
    padding = "same"
    if pad and strides > 1:
        # "<conv>_pad": on torch, `speed.with_fast_layers` moves this padding into the convolution.
        x = layers.ZeroPadding2D(pad, data_format=data_format, dtype=dtype, name=f"{name}_pad")(x)
        padding = "valid"
    return layers.Conv2D(
        filters, kernel_size, strides=strides, padding=padding, use_bias=False,
        kernel_initializer="he_normal", data_format=data_format, dtype=dtype, name=name,
    )(x)


def stem_block(x, kind, data_format, dtype, filters=64, name="stem"):
    """The layers before the first block.

    `cifar`: one 3x3 convolution, full resolution (32x32 stays 32x32).
    `imagenet`: torchvision's 7x7/2 convolution and 3x3/2 max-pool (32x32
    becomes 8x8), which is 15 times cheaper and what report A used.
    """
    if kind not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {kind!r}")
    if kind == "cifar":
        x = conv(x, filters, 3, data_format, dtype, name=f"{name}_conv")
        x = batch_norm(x, data_format, dtype, name=f"{name}_bn")
        return layers.ReLU(dtype=dtype, name=f"{name}_relu")(x)
    x = conv(x, filters, 7, data_format, dtype, strides=2, name=f"{name}_conv")
    x = batch_norm(x, data_format, dtype, name=f"{name}_bn")
    x = layers.ReLU(dtype=dtype, name=f"{name}_relu")(x)
    x = layers.ZeroPadding2D(1, data_format=data_format, dtype=dtype, name=f"{name}_pool_pad")(x)
    return layers.MaxPooling2D(3, strides=2, data_format=data_format, dtype=dtype, name=f"{name}_pool")(x)


def head(x, num_classes, data_format, dtype, name="head"):
    """Global average pooling and a linear classifier that outputs logits."""
    x = layers.GlobalAveragePooling2D(data_format=data_format, dtype=dtype, name=f"{name}_pool")(x)
    return layers.Dense(num_classes, dtype=dtype, name=f"{name}_logits")(x)


def check_data_format(data_format):
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")


# ---------------------------------------------------------------------------
# ResNet18
# ---------------------------------------------------------------------------


def basic_block(x, filters, strides, data_format, dtype, name):
    """Two 3x3 convolutions and a shortcut (a 1x1 projection when the shape changes)."""
    shortcut = x
    if strides != 1 or x.shape[channel_axis(data_format)] != filters:
        shortcut = conv(x, filters, 1, data_format, dtype, strides=strides, name=f"{name}_down_conv")
        shortcut = batch_norm(shortcut, data_format, dtype, name=f"{name}_down_bn")
    x = conv(x, filters, 3, data_format, dtype, strides=strides, name=f"{name}_conv1")
    x = batch_norm(x, data_format, dtype, name=f"{name}_bn1")
    x = layers.ReLU(dtype=dtype, name=f"{name}_relu1")(x)
    x = conv(x, filters, 3, data_format, dtype, name=f"{name}_conv2")
    x = batch_norm(x, data_format, dtype, name=f"{name}_bn2")
    x = layers.Add(dtype=dtype, name=f"{name}_add")([shortcut, x])
    return layers.ReLU(dtype=dtype, name=f"{name}_out")(x)


def resnet18(num_classes, stem="cifar", image_size=32, data_format="channels_last", dtype=None, name="resnet18"):
    """ResNet18 (He et al. 2016) with torchvision's layout of layers.

    Args:
        num_classes: width of the final linear layer (4 for rotations).
        stem: "cifar" (3x3 conv, no pooling) or "imagenet" (7x7/2 + max-pool).
        image_size: height and width of the square RGB input.
        data_format: layout inside the network; inputs are NHWC either way.
        dtype: dtype policy of every layer, e.g. "mixed_bfloat16"; None is float32.
        name: the model's name.
    """
    check_data_format(data_format)
    inputs = keras.Input(shape=(image_size, image_size, 3), name="images")
    x = preprocess(inputs, data_format, dtype)
    x = stem_block(x, stem, data_format, dtype)
    for i, filters in enumerate((64, 128, 256, 512), start=1):
        for j in (1, 2):
            strides = 2 if (i > 1 and j == 1) else 1
            x = basic_block(x, filters, strides, data_format, dtype, name=f"layer{i}_block{j}")
    outputs = head(x, num_classes, data_format, dtype)
    return keras.Model(inputs, outputs, name=name)


# ---------------------------------------------------------------------------
# DenseNet121
# ---------------------------------------------------------------------------


def dense_layer(x, growth_rate, data_format, dtype, name):
    """BN-ReLU-1x1 conv (4k filters), BN-ReLU-3x3 conv (k filters), concatenated to the input."""
    y = batch_norm(x, data_format, dtype, name=f"{name}_bn1")
    y = layers.ReLU(dtype=dtype, name=f"{name}_relu1")(y)
    y = conv(y, 4 * growth_rate, 1, data_format, dtype, name=f"{name}_conv1")
    y = batch_norm(y, data_format, dtype, name=f"{name}_bn2")
    y = layers.ReLU(dtype=dtype, name=f"{name}_relu2")(y)
    y = conv(y, growth_rate, 3, data_format, dtype, name=f"{name}_conv2")
    return layers.Concatenate(axis=channel_axis(data_format), dtype=dtype, name=f"{name}_concat")([x, y])


def transition(x, data_format, dtype, name):
    """Halves the channels (1x1 conv) and the resolution (2x2 average pooling)."""
    x = batch_norm(x, data_format, dtype, name=f"{name}_bn")
    x = layers.ReLU(dtype=dtype, name=f"{name}_relu")(x)
    x = conv(x, x.shape[channel_axis(data_format)] // 2, 1, data_format, dtype, name=f"{name}_conv")
    return layers.AveragePooling2D(2, strides=2, data_format=data_format, dtype=dtype, name=f"{name}_pool")(x)


def densenet(block_sizes, num_classes, stem="cifar", image_size=32, data_format="channels_last", dtype=None,
             growth_rate=32, name="densenet"):
    """DenseNet (Huang et al. 2017), the layout of `keras.applications.densenet`.

    `layerN` is dense block N followed by its transition (the last block is
    followed by the final BatchNorm-ReLU instead), so "the last block" means
    the same thing here as in ResNet18.
    """
    check_data_format(data_format)
    inputs = keras.Input(shape=(image_size, image_size, 3), name="images")
    x = preprocess(inputs, data_format, dtype)
    x = stem_block(x, stem, data_format, dtype, filters=2 * growth_rate)
    for i, size in enumerate(block_sizes, start=1):
        for j in range(1, size + 1):
            x = dense_layer(x, growth_rate, data_format, dtype, name=f"layer{i}_block{j}")
        if i < len(block_sizes):
            x = transition(x, data_format, dtype, name=f"layer{i}_transition")
    last = len(block_sizes)
    x = batch_norm(x, data_format, dtype, name=f"layer{last}_final_bn")
    x = layers.ReLU(dtype=dtype, name=f"layer{last}_final_relu")(x)
    outputs = head(x, num_classes, data_format, dtype)
    return keras.Model(inputs, outputs, name=name)


def densenet121(num_classes, stem="cifar", image_size=32, data_format="channels_last", dtype=None,
                name="densenet121"):
    """DenseNet121: dense blocks of 6, 12, 24 and 16 layers, growth rate 32."""
    return densenet((6, 12, 24, 16), num_classes, stem, image_size, data_format, dtype, name=name)


ARCHITECTURES = {"resnet18": resnet18, "densenet121": densenet121}


def build_model(arch, num_classes, stem="cifar", image_size=32, data_format="channels_last", dtype=None, name=None):
    """Builds one of `ARCHITECTURES` by name."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"model must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    return ARCHITECTURES[arch](num_classes, stem, image_size, data_format, dtype, name=name or arch)


# ---------------------------------------------------------------------------
# Working with blocks
# ---------------------------------------------------------------------------


def block_of(layer_name):
    """The block a layer belongs to: the part of its name before the first `_`."""
    return layer_name.split("_", 1)[0]


def transfer_weights(source, target, skip_blocks=("head",)):
    """Copies weights from `source` to `target`, layer by layer, by name.

    This is the head swap: build a 10-way classifier and transfer
    everything but the `head` from the 4-way rotation model. With
    `skip_blocks=()` it copies a whole model into another layout (kernels
    have the same shape in NCHW and NHWC models, and weights are float32
    under mixed precision). Returns the number of layers copied.
    """
    copied = 0
    for layer in target.layers:
        if not layer.weights or block_of(layer.name) in skip_blocks:
            continue
        layer.set_weights(source.get_layer(layer.name).get_weights())
        copied += 1
    return copied


def set_trainable(model, which):
    """Freezes every block not named by `which` ("all", "last_block" or "head").

    A frozen BatchNormalization layer (trainable=False) runs in inference
    mode in Keras 3: it uses and keeps its moving statistics. PyTorch code
    that only sets `requires_grad=False` keeps updating them; we do not.
    """
    if which not in TRAINABLE_CHOICES:
        raise ValueError(f"trainable must be one of {sorted(TRAINABLE_CHOICES)}, got {which!r}")
    trainable_blocks = TRAINABLE_CHOICES[which]
    for layer in model.layers:
        layer.trainable = block_of(layer.name) in trainable_blocks
    return model


def data_format_of(model):
    """The layout inside `model`: "channels_first" where `preprocess` transposes the images, else "channels_last"."""
    names = {layer.name for layer in model.layers}
    return "channels_first" if "preprocess_to_channels_first" in names else "channels_last"
