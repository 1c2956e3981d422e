"""
Title: Self-supervised pretraining by predicting image rotations (RotNet)
Author: kerasrot contributors
Date created: 2026/11/26
Last modified: 2026/12/05
Description: A ResNet18 learns, without labels, which way up CIFAR-10 images are; its features then beat random ones.
Accelerator: GPU (optional; the default sizes run on a CPU)
"""

"""
## Introduction

A network that can tell whether an image was turned by 0, 90, 180 or 270
degrees must have learned what objects look like: where the sky is, which
way eyes and wheels face. That is the idea of RotNet (Gidaris, Singh and
Komodakis, "Unsupervised representation learning by predicting image
rotations", ICLR 2018): rotations are free labels, so a network can be
pretrained on unlabelled images.

This example runs the experiment of the reports' Table 2 on CIFAR-10:

1. pretrain a ResNet18 to predict the rotation of unlabelled images;
2. swap its 4-way head for a 10-way classifier, freeze everything but the
   last block (`layer4`) and train it on labels;
3. do the same from random weights, and compare.

If the rotation model learned useful features, its frozen blocks give the
last block a head start that random blocks cannot.

The building blocks come from `kerasrot` (`help(kerasrot)`); everything
else is `model.fit`. Run it as a script (`python examples/rotnet_table2.py`,
add `--tiny` for a two-minute smoke run) or cell by cell in a notebook.
"""

"""
## Setup
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")  # jax and tensorflow work too

import keras
import matplotlib.pyplot as plt

import kerasrot

parser = argparse.ArgumentParser(description="RotNet on CIFAR-10: rotation weights vs random weights.")
parser.add_argument("--data-dir", help="image folders DIR/cifar10/{train,test}/<class>/ (default: download)")
parser.add_argument("--tiny", action="store_true", help="a smoke run of a couple of minutes")
args, _ = parser.parse_known_args()  # known args only: notebooks pass their own

"""
## Hyperparameters

1,000 images per class, 20 rotation epochs, 5 classification epochs, SGD
with Nesterov momentum and a one-cycle learning rate (a linear warm-up of
an epoch or two to the peak, then cosine decay to zero). They sit in one
dict, the form a `kerasrot` recipe gives them, because
`kerasrot.compile_model` reads them from it below. `--tiny` shrinks the
sizes to seconds per stage, too small to show anything but that the code
runs.
"""

IMAGES_PER_CLASS, ROTATION_EPOCHS, CLASSIFY_EPOCHS = (10, 3, 2) if args.tiny else (1000, 20, 5)
ROTATION_TEST_PER_CLASS, CLASSIFY_TEST_PER_CLASS = (4, 4) if args.tiny else (100, 500)
BATCH_SIZE = 128  # images per batch; a rotation batch holds their 4 rotations, 512 samples
HYPERPARAMETERS = {
    "optimizer": "sgd", "momentum": 0.9, "nesterov": True,
    "learning_rate": 0.1, "schedule": "cosine", "warmup_epochs": 1,
    "weight_decay": 5e-3,  # Keras' decoupled decay: about 0.0005 in PyTorch's coupled form
    "global_clipnorm": 0, "label_smoothing": 0, "jit_compile": "auto",
}
# PyTorch convolves NCHW: on its backend a channels_first network skips a
# transpose per convolution. The models take NHWC images either way.
DATA_FORMAT = "channels_first" if keras.backend.backend() == "torch" else "channels_last"
keras.utils.set_random_seed(0)

"""
## Data

`kerasrot.load_split` reads a whole split into uint8 arrays, with
`tfds.load("cifar10")` or from local image folders. A balanced subset with
a fixed seed keeps both stages on the same images.
"""


def subset(split, per_class):
    return split.subset(kerasrot.balanced_subset(split.labels, per_class, seed=0))


train = subset(kerasrot.load_split("cifar10", "train", 32, args.data_dir), IMAGES_PER_CLASS)
test = kerasrot.load_split("cifar10", "test", 32, args.data_dir)
print(f"{len(train)} training images, {len(test)} test images")

"""
## The pretext task: four rotations of every image

`kerasrot.Batches` makes the batches `model.fit` consumes. Each training
image is padded and randomly cropped, maybe flipped horizontally, and then,
with `rotations=True`, replaced by its four exact quarter turns
(`kerasrot.four_rotations`), labelled 0 to 3. All four copies of an image
share a batch, as in the paper. Flips come before rotations, and only
horizontal ones, so the labels stay true.
"""

rotation_train = kerasrot.Batches(train.images, train.labels, BATCH_SIZE, rotations=True, augment=True, shuffle=True)
rotation_test_images = subset(test, ROTATION_TEST_PER_CLASS)
rotation_test = kerasrot.Batches(rotation_test_images.images, rotation_test_images.labels, BATCH_SIZE, rotations=True)

images, rotations = (keras.ops.convert_to_numpy(t) for t in rotation_test[0])
quarter = len(images) // 4  # copy k of image i is at k * quarter + i
figure, axes = plt.subplots(2, 4, figsize=(8, 4.4))
for row, i in enumerate((0, quarter - 1)):  # the first and the last image of the batch
    for k in range(4):
        axes[row, k].imshow(images[k * quarter + i].astype("uint8"))
        axes[row, k].set_title(f"label {rotations[k * quarter + i]}: {90 * k} deg", fontsize=9)
        axes[row, k].axis("off")
figure.tight_layout()
figure.savefig("rotations.png")

"""
## Training a model

One function trains any of the three models. `kerasrot.compile_model`
builds the optimiser (SGD with Nesterov momentum and decoupled weight
decay), the warm-up + cosine schedule, which needs the number of steps,
and the cross-entropy loss from the dict; the `kerasrot` command compiles
every stage with it too. `kerasrot.EpochSetter` tells the batches which
epoch starts, so that each epoch has its own order and augmentation,
reproducible from the seed.
"""


def train_model(model, train_batches, test_batches, epochs, warmup_epochs=1):
    settings = {**HYPERPARAMETERS, "epochs": epochs, "warmup_epochs": warmup_epochs}
    kerasrot.compile_model(model, settings, steps_per_epoch=len(train_batches))
    history = model.fit(train_batches, epochs=epochs, validation_data=test_batches,
                        callbacks=[kerasrot.EpochSetter(train_batches)], verbose=2)
    return [100 * a for a in history.history["val_accuracy"]]


"""
## Rotation pretraining

A ResNet18 with a 4-way head. The ImageNet stem (a 7x7 stride-2 convolution
and a max-pool) makes it 15 times cheaper than the CIFAR stem at 32x32,
which is what a CPU needs. Its layers are named by block (`stem`,
`layer1` .. `layer4`, `head`), which the next steps rely on.
"""

started = time.perf_counter()
rotnet = kerasrot.resnet18(num_classes=4, stem="imagenet", data_format=DATA_FORMAT, name="rotnet")
rotation_curve = train_model(rotnet, rotation_train, rotation_test, ROTATION_EPOCHS, warmup_epochs=2)

"""
## The head swap and the frozen backbone

A 10-way ResNet18 gets every weight of the rotation model but its head
(`kerasrot.transfer_weights` copies layer by layer, by name). Then
everything but `layer4` and the new head is frozen. In Keras 3 a frozen
BatchNormalization layer also runs in inference mode: its statistics stay
those the rotation model learned.

The control is the same network from random weights, frozen the same way:
its `layer4` must learn from random features.
"""


def final_block_classifier(weights_from=None):
    model = kerasrot.resnet18(num_classes=10, stem="imagenet", data_format=DATA_FORMAT)
    if weights_from is not None:
        kerasrot.transfer_weights(weights_from, model, skip_blocks=("head",))
    return kerasrot.set_trainable(model, "last_block")


labelled_train = kerasrot.Batches(train.images, train.labels, BATCH_SIZE, augment=True, shuffle=True)
labelled_test_images = subset(test, CLASSIFY_TEST_PER_CLASS)
labelled_test = kerasrot.Batches(labelled_test_images.images, labelled_test_images.labels, BATCH_SIZE)
curves = {}
for init, weights_from in (("rotation weights", rotnet), ("random weights", None)):
    model = final_block_classifier(weights_from)
    curves[init] = train_model(model, labelled_train, labelled_test, CLASSIFY_EPOCHS)

"""
## Results

The rotation model's accuracy is over the four rotations of every test
image (chance: 25%); the classifiers' over the test images (chance: 10%).
"""

print(f"\nrotation accuracy: {rotation_curve[-1]:.2f}%")
for init, curve in curves.items():
    print(f"final block + head from {init}: {curve[-1]:.2f}%")
print(f"({keras.backend.backend()} backend, {(time.perf_counter() - started) / 60:.1f} min of training)")

figure, axis = plt.subplots(figsize=(6, 4))
for init, curve in curves.items():
    axis.plot(range(1, len(curve) + 1), curve, marker="o", label=f"from {init}")
axis.set(xlabel="epoch", ylabel="CIFAR-10 test accuracy (%)", title="Final block + head: rotation vs random",
         xticks=range(1, CLASSIFY_EPOCHS + 1))
axis.legend()
figure.savefig("rotnet_table2.png")

"""
## Where the networks look

A block's attention map sums the absolute value of its feature maps over
the channels, each raised to a power p (the paper's Figure 3): bright where
the block responds strongly. `kerasrot.plot_attention` draws the map of
each block over the same test images for every model given; the random
control is a ResNet18 as it was before any training. Compare the rows: does
the rotation model look at the objects?
"""

shown = kerasrot.pick_images(test.labels, count=8, seed=0)
random_start = kerasrot.resnet18(num_classes=4, stem="imagenet", data_format=DATA_FORMAT)
figure = kerasrot.plot_attention({"rotation": rotnet, "random": random_start},
                                 test.images[shown], test.labels[shown], test.class_names)
figure.savefig("attention.png", dpi=150)

"""
## What to expect

At the default sizes, on 2 CPU cores (an AMD EPYC with AVX512-BF16, torch
backend, 20 minutes), the rotation model reached 73.5%, and the final block
trained from its weights 54.7% against 43.3% from random weights: the
frozen rotation features are worth eleven points. `kerasrot run table2
--preset quick` gives the same picture in 8 minutes on 2 AVX2-only cores
(results/table2/quick/), with a shorter rotation stage. The reports this
reproduces, with 45 rotation epochs and all 50,000 images, found 62%
against 45%; `kerasrot run table2 --preset paper` runs that budget.
"""
