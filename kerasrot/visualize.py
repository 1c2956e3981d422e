"""What a trained network looks at, and what its first layer learned.

Attention maps (Gidaris et al. 2018, Figure 3, after Zagoruyko & Komodakis'
attention transfer): a block's output is C feature maps A_c; where the
network "looks" is where they are large, summed over the channels:

    attention(x, y) = sum_c |A_c(x, y)| ** p

A larger p weights the strongest activations more. The paper uses p = 1, 2
and 4 for its conv layers 1, 2 and 3; our fourth block keeps p = 4. To
tell up from down a rotation model must find the objects' parts, and the
paper finds its maps, like a supervised model's, concentrate on the
objects; an untrained network of the same shape is the control.

First-layer filters: the `stem_conv` kernels drawn as small RGB images.
Trained ones tend to look like edge and colour detectors, untrained ones like noise.

The plot functions return a matplotlib Figure; the caller saves it.
"""

import keras
import numpy as np

from kerasrot.models import channel_axis, data_format_of
from kerasrot.probes import block_outputs

ATTENTION_POWERS = {"stem": 1, "layer1": 2, "layer2": 4, "layer3": 4}
CELL_INCHES = 0.9  # one image or map in `plot_attention`
KERNEL_PIXELS = 21  # a kernel's side in `plot_filters`: 3x3 and 7x7 both scale to 21x21
IMAGE_GROUPS = 2  # `plot_attention` draws its images in this many side-by-side groups


def attention_maps(model, images, powers=ATTENTION_POWERS, batch_size=64):
    """`{block: float32 array [N, h, w]}`: the attention map of every block in `powers`, for every image.

    One model from the images to every block's output runs over the images
    a batch at a time, in inference mode: BatchNorm uses its moving
    statistics, so an image's map does not depend on its batch.
    """
    extractor = keras.Model(model.input, block_outputs(model, list(powers)))
    axis = channel_axis(data_format_of(model))
    maps = {block: [] for block in powers}
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start:start + batch_size], "float32")  # the models take floats in [0, 255]
        for block, output in extractor.predict_on_batch(batch).items():
            activation = np.asarray(output, "float32")  # also under mixed precision
            maps[block].append(np.sum(np.abs(activation) ** powers[block], axis=axis))
    return {block: np.concatenate(parts) for block, parts in maps.items()}


def _scaled_to_unit(x, axes):
    """`x` min-max scaled to [0, 1] over `axes`, separately for each index of the other axes; constant parts become 0."""
    low = x.min(axis=axes, keepdims=True)
    span = x.max(axis=axes, keepdims=True) - low
    return np.where(span > 0, (x - low) / np.where(span > 0, span, 1), 0).astype("float32")


def upsampled(maps, size):
    """`maps` `[N, h, w]` resized (bilinear) to `[N, size, size]` and scaled to [0, 1] per map, for display.

    Each map gets its own scale: the figure compares where a network looks,
    not how strongly (blocks differ in scale by orders of magnitude).
    """
    resized = keras.ops.image.resize(np.asarray(maps, "float32")[..., None], (size, size),
                                     interpolation="bilinear", data_format="channels_last")
    return _scaled_to_unit(keras.ops.convert_to_numpy(resized)[..., 0], axes=(1, 2))


def first_layer_filters(model):
    """`[filters, k, k, 3]`: the `stem_conv` kernels (stored `(k, k, 3, filters)`), each scaled to [0, 1] on its own."""
    kernel = keras.ops.convert_to_numpy(model.get_layer("stem_conv").kernel).astype("float32")
    return _scaled_to_unit(np.transpose(kernel, (3, 0, 1, 2)), axes=(1, 2, 3))


def pick_images(labels, count=8, seed=0):
    """Indices of `count` images of the first `count` classes, one per class, in class order.

    Each is the first image of its class in an order shuffled by `seed`: a
    fixed seed gives every model the same images, another seed other ones.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)[:count]
    if len(classes) < count:
        raise ValueError(f"{count} images of different classes asked for, but there are {len(classes)} classes")
    order = np.random.default_rng(seed).permutation(len(labels))
    return np.array([order[np.argmax(labels[order] == c)] for c in classes])


def pyplot():
    """matplotlib's pyplot, imported when a figure is drawn. Its backend is left as it is: a notebook shows the
    figures inline, a script without a screen draws off screen (the `kerasrot` command chooses Agg)."""
    import matplotlib.pyplot as plt

    return plt


def _row_label(title, i, labels, class_names):
    """The model's title, and below it the class of image `i` where labels are given."""
    if labels is None:
        return title
    return f"{title}\n{class_names[labels[i]] if class_names else labels[i]}"


def plot_attention(models, images, labels=None, class_names=None):
    """The attention maps of every block of every model, drawn over the images (the paper's Figure 3).

    `models`: `{row title: keras model}`; `images`: uint8 `[N, S, S, 3]`,
    with their `labels` (class indices, named by `class_names`) if given.
    For each image, one row per model: the image, then each block's map
    over it. The images come in `IMAGE_GROUPS` side-by-side groups, so that
    8 images and 3 models make 12 rows of 10 cells rather than 24 of 5.
    """
    plt = pyplot()
    images = np.asarray(images)
    blocks = list(ATTENTION_POWERS)
    maps = {title: {block: upsampled(m, images.shape[1]) for block, m in attention_maps(model, images).items()}
            for title, model in models.items()}
    per_group = -(-len(images) // IMAGE_GROUPS)  # ceil
    rows, cols = per_group * len(models), IMAGE_GROUPS * (1 + len(blocks))
    fig, axes = plt.subplots(rows, cols, figsize=(CELL_INCHES * cols, CELL_INCHES * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[], frame_on=False)  # frameless: the cells of a missing last image stay blank
    for i, image in enumerate(images):
        group, position = divmod(i, per_group)
        for m, title in enumerate(models):
            row, first = axes[position * len(models) + m], group * (1 + len(blocks))
            row[first].imshow(image)
            row[first].set_ylabel(_row_label(title, i, labels, class_names), fontsize=6)
            for b, block in enumerate(blocks, start=1):
                row[first + b].imshow(image)
                row[first + b].imshow(maps[title][block][i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
    for group in range(IMAGE_GROUPS):  # column titles, over the top row of each group
        for b, column in enumerate(["image", *(f"{block}, p={ATTENTION_POWERS[block]}" for block in blocks)]):
            axes[0, group * (1 + len(blocks)) + b].set_title(column, fontsize=7)
    fig.suptitle("Attention: sum over channels of |activation|^p, per block (red: where the network looks)",
                 fontsize=8)
    fig.tight_layout(pad=0.3, h_pad=0.1, w_pad=0.1)
    return fig


def _grid(filters):
    """One RGB image of `filters` `[F, k, k, 3]`: a square grid, each kernel enlarged by repeating its
    pixels (nearest neighbour, so every weight stays one sharp square) with a 1-pixel white gap between."""
    count, k = filters.shape[:2]
    scale = max(1, KERNEL_PIXELS // k)
    big = filters.repeat(scale, axis=1).repeat(scale, axis=2)
    side, cell = int(np.ceil(np.sqrt(count))), k * scale + 1
    grid = np.ones((side * cell - 1, side * cell - 1, 3), "float32")
    for i, kernel in enumerate(big):
        row, col = divmod(i, side)
        grid[row * cell:row * cell + cell - 1, col * cell:col * cell + cell - 1] = kernel
    return grid


def plot_filters(models):
    """Every model's first-layer filters, one panel per model (`{title: keras model}`), side by side."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 4.4), squeeze=False)
    for ax, (title, model) in zip(axes[0], models.items()):
        filters = first_layer_filters(model)
        ax.imshow(_grid(filters), interpolation="nearest")
        ax.set_title(f"{title}: {len(filters)} filters, {filters.shape[1]}x{filters.shape[2]}", fontsize=9)
        ax.set(xticks=[], yticks=[])
    fig.suptitle("First-layer filters (each scaled to [0, 1] on its own)", fontsize=10)
    fig.tight_layout()
    return fig
