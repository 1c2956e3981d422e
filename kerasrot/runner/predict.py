"""Predict: a trained model applied to your own images (`kerasrot predict`).

A rotation model answers "which way up is this photo?": for each image, the
quarter turn it predicts the image was given (0, 90, 180 or 270 degrees
counter-clockwise) and its probability, and with `--upright DIR` it writes
the image back turned the other way, upright. A classifier answers with its
top 3 classes. Any image Pillow reads, any size: each is read as a viewer
shows it (its EXIF orientation applied) and resized as the stage was trained
(`kerasrot.folders.read_image`).

The model is a `.keras` file, or a recipe's stage named as `kerasrot show`
names it (`table2:rotation`), found in the stage cache under the key the
same `--preset`, `--set`, data and backend give it.
"""

import dataclasses
import json
from pathlib import Path

import keras
import numpy as np

from kerasrot import data, folders
from kerasrot.rotations import NUM_ROTATIONS
from kerasrot.runner.evaluate import load_checkpoint, recorded_result

TOP = 3  # classes shown per image


@dataclasses.dataclass
class Prediction:
    image: str
    task: str  # "rotation" or "classify"
    labels: list  # the top predictions, most probable first: quarter turns, or class names
    probabilities: list

    def as_dict(self):
        if self.task == "rotation":
            turns = self.labels[0]
            return {"image": self.image, "task": self.task, "quarter_turns": turns, "degrees": 90 * turns,
                    "probability": self.probabilities[0],
                    "probabilities": dict(zip(map(str, self.labels), self.probabilities))}
        return {"image": self.image, "task": self.task,
                "top": [{"class": c, "probability": p} for c, p in zip(self.labels, self.probabilities)]}

    def describe(self):
        if self.task == "rotation":
            return f"turned {90 * self.labels[0]} degrees counter-clockwise ({100 * self.probabilities[0]:.1f}%)"
        return ", ".join(f"{c} ({100 * p:.1f}%)" for c, p in zip(self.labels, self.probabilities))


def stage_model_path(name, preset, overrides, workdir, data_dir):
    """The model.keras of a recipe's stage, `RECIPE:STAGE`, as `kerasrot run` with these options keys it."""
    from kerasrot.runner import config, stages

    recipe_name, _, stage_name = name.partition(":")
    recipe = config.load(recipe_name, preset, overrides)
    by_name = {stage.name: stage for stage in recipe.stages}
    if stage_name not in by_name:
        raise data.DataError(f"{recipe_name} --preset {preset} has no stage {stage_name!r}; "
                             f"its stages: {', '.join(by_name)}")
    stages.resolve_stages(recipe, stages.RunOptions(data_dir=data_dir, workdir=Path(workdir), machine="", devices="",
                                                    commit=""))
    path = stages.stage_dir(workdir, by_name[stage_name]) / "model.keras"
    if not path.exists():
        raise data.DataError(f"no trained {name} in {workdir} for --preset {preset} with these --set options, data "
                             f"and backend {keras.backend.backend()}; run `kerasrot run {recipe_name} --preset "
                             f"{preset}` first, or pass the model's .keras file")
    return path


def image_paths(arguments):
    """`[(path, name to write it back under)]` for image files and folders of them (nested any way)."""
    found = []
    for argument in map(Path, arguments):
        if argument.is_dir():
            index = folders.scan(argument)
            if index.bad:
                raise data.DataError(f"{len(index.bad)} unreadable image file(s): {folders.describe_bad(index)}")
            found += [(index.root / name, Path(name)) for name in index.files]
        elif argument.exists():
            found.append((argument, Path(argument.name)))
        else:
            raise data.DataError(f"no such image or folder: {argument}")
    return found


def task_of(model, path):
    """"rotation" or "classify", from the stage's record beside the model, else from the model itself."""
    shape = model.input_shape
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
        raise data.DataError(f"{path} takes inputs of shape {shape[1:]}, not images: neither a rotation model nor "
                             "a classifier (a probe's head, say)")
    recorded = recorded_result(path).get("task")
    if recorded in ("rotation", "classify"):
        return recorded
    return "rotation" if "_rotation_" in model.name or model.output_shape[-1] == NUM_ROTATIONS else "classify"


def class_names_of(model, path):
    """The classes a classifier names: as recorded beside it, else its dataset's, else "class i"."""
    recorded = recorded_result(path)
    names = recorded.get("class_names")
    dataset = recorded.get("settings", {}).get("dataset") or model.name.rsplit("_", 1)[-1]
    if not names and dataset in data.DATASETS:
        names = list(data.DATASETS[dataset].class_names)
    outputs = model.output_shape[-1]
    return names if names and len(names) == outputs else [f"class {i}" for i in range(outputs)]


def predict(model_path, paths, batch_size=64):
    """`(model, task, [Prediction])` for the images at `paths` (`image_paths`)."""
    model = load_checkpoint(model_path)
    task = task_of(model, model_path)
    names = list(range(NUM_ROTATIONS)) if task == "rotation" else class_names_of(model, model_path)
    size, predictions = model.input_shape[1], []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = np.stack([folders.read_image(path, size, exif=True)[0] for path, _ in chunk]).astype("float32")
        probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(model.predict_on_batch(images), axis=-1))
        for (path, _), row in zip(chunk, probabilities.astype("float64")):
            top = np.argsort(-row)[:TOP if task == "classify" else NUM_ROTATIONS]
            predictions.append(Prediction(str(path), task, [names[i] for i in top],
                                          [round(float(row[i]), 4) for i in top]))
    return model, task, predictions


# PIL's transposes that undo k counter-clockwise quarter turns (np.rot90's direction), k = 1, 2, 3.
UNDO_TURNS = {1: "ROTATE_270", 2: "ROTATE_180", 3: "ROTATE_90"}


def write_upright(paths, predictions, folder):
    """Each image turned back by its predicted quarter turns, at its own size, in its own format -> paths written.

    Quarter turns move pixels without changing them: a PNG comes back pixel
    for pixel; a JPEG is encoded again (quality 95).
    """
    from PIL import Image, ImageOps

    folder = Path(folder)
    written = []
    for (path, name), prediction in zip(paths, predictions):
        target = folder / name
        if target.resolve() == Path(path).resolve():
            raise data.DataError(f"--upright {folder} would overwrite {path}; choose another folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            kind = image.format
            image = ImageOps.exif_transpose(image)  # as shown, then without the orientation tag
            turns = prediction.labels[0]
            upright = image.transpose(getattr(Image.Transpose, UNDO_TURNS[turns])) if turns else image
            upright.save(target, format=kind, **({"quality": 95} if kind == "JPEG" else {}))
        written.append(target)
    return written


def table(predictions):
    """A Markdown table of the predictions, one row per image."""
    rows = ["| image | prediction |", "|---|---|"]
    rows += [f"| {p.image} | {p.describe()} |" for p in predictions]
    return "\n".join(rows)


def as_json(predictions):
    return json.dumps([p.as_dict() for p in predictions], indent=2)


def gallery(paths, predictions, size):
    """A figure of the images, as the model saw them, each titled with its prediction."""
    from kerasrot.runner.reporting import pyplot

    plt = pyplot()
    columns = min(len(paths), 6)
    rows = -(-len(paths) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (path, name), prediction in zip(axes.flat, paths, predictions):
        ax.imshow(folders.read_image(path, max(size, 96), exif=True)[0])
        label = (f"{90 * prediction.labels[0]} deg ccw" if prediction.task == "rotation"
                 else str(prediction.labels[0]))
        ax.set_title(f"{str(name)[:22]}\n{label}, {100 * prediction.probabilities[0]:.0f}%", fontsize=8)
    fig.tight_layout()
    return fig
