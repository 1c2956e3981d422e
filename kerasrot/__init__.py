"""kerasrot: RotNet's rotation pretraining on CIFAR-10, in Keras 3.

A network that can tell whether an image was turned by 0, 90, 180 or 270
degrees has learned what objects look like; rotations are free labels, so
it can learn that from unlabelled images (Gidaris et al., ICLR 2018). Here a
ResNet18 learns to predict the rotations of CIFAR-10 images; its weights
then start a classifier whose blocks are frozen but for the last, against
the same network from random weights. examples/rotnet_table2.py tells the
whole experiment with the functions below and `model.fit`.

    train = kerasrot.load_split("cifar10", "train", 32)        # uint8 arrays, via tfds
    batches = kerasrot.Batches(train.images, train.labels, 128,
                               rotations=True, augment=True, shuffle=True)
    rotnet = kerasrot.resnet18(num_classes=4)                  # predicts the rotation
    kerasrot.compile_model(rotnet, hyperparameters, len(batches))
    rotnet.fit(batches, epochs=..., callbacks=[kerasrot.EpochSetter(batches)])
    classifier = kerasrot.resnet18(num_classes=10)
    kerasrot.transfer_weights(rotnet, classifier)              # all but the head
    kerasrot.set_trainable(classifier, "last_block")           # layer4 + head train

The experiment's modules, in reading order: `kerasrot.data`,
`kerasrot.rotations`, `kerasrot.pipeline`, `kerasrot.models`,
`kerasrot.training`, then `kerasrot.frozen` and `kerasrot.probes`
(what frozen blocks compute, computed once), `kerasrot.knn` (a kNN
monitor of the features during pretraining) and `kerasrot.visualize`
(attention maps and first-layer filters). `kerasrot.folders` is the one
reader of image folders behind `kerasrot.data`. `kerasrot.runner` is the machinery behind the
`kerasrot` command (recipes, the stage cache, speed-ups, reports).
"""

import importlib
import os as _os

# TensorFlow turns on its oneDNN (MKL) kernels by itself only on CPUs with
# AVX-512 VNNI, AVX512-BF16 or AMX. Elsewhere (AVX2-only CPUs, such as many
# AMD EPYC virtual machines) it falls back to Eigen's convolutions, which made
# a ResNet18 training step 7.9x slower (benchmarks/throughput.py on 2 AVX2
# cores: 30.6 vs 240.4 samples/s). TensorFlow reads the switch when it is
# imported, so it is set here, before any kerasrot module imports Keras
# (which imports TensorFlow on its backend); a value the user set wins.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"

# The public API. Loaded on first use: importing kerasrot does not import
# Keras, so the `kerasrot` command can check KERAS_BACKEND first.
_PUBLIC = {
    "load_split": "data", "balanced_subset": "data", "DataError": "data",
    "four_rotations": "rotations", "crop_and_flip": "rotations",
    "Batches": "pipeline", "EpochSetter": "pipeline",
    "resnet18": "models", "densenet121": "models", "transfer_weights": "models", "set_trainable": "models",
    "compile_model": "training",
    "plot_attention": "visualize", "plot_filters": "visualize", "pick_images": "visualize",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'kerasrot' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kerasrot.{_PUBLIC[name]}"), name)


def __dir__():
    return sorted([*globals(), *_PUBLIC])
