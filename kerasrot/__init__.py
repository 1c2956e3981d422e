"""kerasrot: RotNet's rotation pretraining on CIFAR-10, in Keras 3.

The experiment, in the order a reader meets it:

* `kerasrot.data`: CIFAR-10 and ImageNette as arrays (tfds or image folders);
* `kerasrot.rotations`: the pretext task (four exact quarter turns of every
  image, labelled 0-3) and the augmentation that keeps those labels true;
* `kerasrot.pipeline`: batches for `model.fit`, the same on every backend;
* `kerasrot.models`: ResNet18 and DenseNet121 with named blocks, freezing
  by block, the head swap;
* `kerasrot.training`: optimiser, schedule, `model.fit` with Keras' callbacks.

`kerasrot.runner` is the machinery around it (recipes and presets, the
stage cache, speed-ups, reports, the `kerasrot` command).
"""

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
