"""kerasrot: RotNet's rotation pretraining on CIFAR-10, in Keras 3.

Read in this order: `pipeline` (the four rotations), `models` (ResNet18 and
DenseNet121 with named blocks), `training`, `recipes` (experiments as
data), `runner`, `reporting`, `cli`.
"""

import os as _os

# TensorFlow turns on its oneDNN (MKL) kernels by itself only on CPUs with
# AVX-512 VNNI, AVX512-BF16 or AMX. Elsewhere (AVX2-only CPUs, such as many
# AMD EPYC virtual machines) it falls back to Eigen's convolutions, which made
# a ResNet18 training step 7.9x slower (benchmarks/throughput.py on 2 AVX2
# cores: 30.6 vs 240.4 samples/s). The switch is read when TensorFlow is
# imported, so it is set here, before any kerasrot module imports Keras
# (which imports TensorFlow on its backend); a value the user set wins.
# The other backend choices are in `kerasrot.backend`.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
