"""Evaluate: the accuracy of a saved `.keras` model, under any backend.

The task is read off the model: 4 outputs predict rotations, otherwise it
classifies. The dataset, the test subset and the batch size come from the
`result.json` that the runner writes beside every model it trains (else
from the model's name, `resnet18_rotation_cifar10`), so `kerasrot evaluate
model.keras` re-measures the recorded number, on whichever backend
`KERAS_BACKEND` names.
"""

import json
import zipfile
from pathlib import Path

import keras

from kerasrot import data
from kerasrot.data import DataError
from kerasrot.pipeline import Batches
from kerasrot.rotations import NUM_ROTATIONS
from kerasrot.runner import device
from kerasrot.training import accuracy


def load_checkpoint(path):
    path = Path(path)
    if not path.exists():
        raise DataError(f"checkpoint {path} does not exist")
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not a .keras model file (corrupt or of another kind)")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - Keras raises many kinds here
        raise DataError(f"cannot load {path}: {type(error).__name__}: {str(error)[:200]}") from None


def evaluate_checkpoint(path, data_dir, dataset=None, test_images_per_class=None):
    """Evaluates the checkpoint at `path` and returns a one-paragraph report.

    `test_images_per_class`: None as recorded, "all", or a number.
    """
    model = load_checkpoint(path)
    recorded = recorded_result(path)
    settings = recorded.get("settings", {})
    outputs = model.output_shape[-1]
    task = "rotation" if outputs == NUM_ROTATIONS else "classify"
    dataset = dataset or settings.get("dataset") or _dataset_from_name(model.name)
    data.check_dataset_name(dataset)
    image_size = model.input_shape[1]
    if model.input_shape[1:] != (image_size, image_size, 3):
        raise DataError(f"{path} takes inputs of shape {model.input_shape[1:]}, not square RGB images")

    per_class = _per_class(test_images_per_class, settings)
    test = data.load_split(dataset, "test", image_size, data_dir, labelled=task == "classify",
                           streaming=settings.get("streaming") == "on", bad_images=settings.get("bad_images", "error"))
    if task == "classify" and outputs != len(test.class_names):
        raise DataError(f"{path} predicts {outputs} classes, {dataset} has {len(test.class_names)}: "
                        f"not a model of {dataset}")
    test = test.subset(data.balanced_subset(test.labels, per_class, settings.get("seed", 0)))
    batch_size = settings.get("batch_size", 256)  # as when recorded: the same sums
    batches = Batches(test.images, test.labels, batch_size, rotations=task == "rotation")
    measured = accuracy(model, batches)

    what = "rotated test images (4 per image)" if task == "rotation" else "test images"
    lines = [
        f"accuracy {measured:.2f}% on {batches.num_samples} {what} of {dataset} "
        f"({task}; backend {keras.backend.backend()}, {device.description()})"
    ]
    if "accuracy" in recorded:
        lines.append(f"recorded when trained: {recorded['accuracy']:.2f}% (backend {recorded.get('backend')})")
    return "\n".join(lines)


def recorded_result(path):
    result = Path(path).with_name("result.json")
    try:
        return json.loads(result.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _dataset_from_name(name):
    for dataset in data.DATASETS:
        if name.endswith(f"_{dataset}"):
            return dataset
    return "cifar10"


def _per_class(text, settings):
    if text is None:
        return settings.get("test_images_per_class")
    if str(text).lower() == "all":
        return None
    if not str(text).isdigit() or int(text) < 1:
        raise DataError(f"--test-images-per-class must be a positive number or 'all', got {text!r}")
    return int(text)
