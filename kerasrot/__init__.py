"""kerasrot: RotNet's rotation pretraining on CIFAR-10, in Keras 3.

Read in this order: `pipeline` (the four rotations), `models` (ResNet18 and
DenseNet121 with named blocks), `training`, `recipes` (experiments as
data), `runner`, `reporting`, `cli`.
"""

__version__ = "0.1.0"
