"""Frozen blocks: what the frozen part of a network computes, computed once.

When only the last block and the head train (`set_trainable(model,
"last_block")`), everything before them is frozen: its weights never change
and its BatchNormalization runs in inference mode. For a given image it
computes the same output in every epoch, yet training the whole model
computes it again at every step, and then the test pass once more.

So the model is cut where the frozen part ends (`split_at_frozen`): the
frozen part runs once over every image (`frozen_outputs`), and the trainable
part (layer4 and the head) trains on those arrays as if they were images.
The two parts share the model's layers, so training the trainable part
trains the model: the same weights learn from the same inputs in the same
order, for a fraction of the work.

That holds while an image looks the same in every epoch. With crop + flip
(`augment = true`) every epoch sees a new version of each image, and the
frozen part must run on it again: then the whole model trains as usual.
The probes (`kerasrot.probes`) stand on the same idea: a frozen network's
block outputs, computed once, for classifiers that train in seconds.
"""

import keras
import numpy as np


def computed_once(trainable, augment):
    """Whether a classifier trained with `trainable` blocks (`kerasrot.models.set_trainable`) has a
    frozen part whose outputs stay the same every epoch: some blocks frozen, no crop + flip."""
    return trainable != "all" and not augment


def split_at_frozen(model):
    """`(frozen, trainable)`: two models, `trainable(frozen(x))` computing `model(x)`.

    The cut is the output of the last frozen layer (the layers are in the
    order data flows). Both parts share `model`'s layers and weights.
    Raises ValueError where nothing is frozen, or where a frozen layer
    comes after a trainable one (then there is no single place to cut).
    """
    layers = model.layers
    frozen = [i for i, layer in enumerate(layers) if not layer.trainable and i > 0]  # 0: the input
    if not frozen or frozen[-1] == len(layers) - 1:
        raise ValueError(f"{model.name} has no frozen layers before trainable ones to split at")
    last = frozen[-1]
    late = [layer.name for layer in layers[1:last] if layer.trainable]
    if late:
        raise ValueError(f"{model.name}: trainable {late[0]} comes before frozen {layers[last].name}; "
                         "a model splits only where all its frozen layers come first")
    cut = layers[last].output
    return (keras.Model(model.input, cut, name=f"{model.name}_frozen"),
            keras.Model(cut, model.output, name=f"{model.name}_trainable"))


def frozen_outputs(model, batches, on_batch=None):
    """`model`'s outputs for every batch of `batches`, in order, and their labels: float32 arrays `[N, ...]`.

    Runs in inference mode (BatchNorm uses its moving statistics), one
    batch at a time; a model with several outputs gives a dict of arrays.
    `on_batch(images)` is called after each batch with its size (progress reports).
    """
    outputs, labels = [], []
    for i in range(len(batches)):
        images, batch_labels = batches[i]
        outputs.append(keras.tree.map_structure(lambda x: np.asarray(x, "float32"), model.predict_on_batch(images)))
        labels.append(keras.ops.convert_to_numpy(batch_labels))
        if on_batch:
            on_batch(len(labels[-1]))
    return keras.tree.map_structure(lambda *parts: np.concatenate(parts), *outputs), np.concatenate(labels)
