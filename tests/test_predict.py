"""`kerasrot predict`: a trained model on image files, scored as `kerasrot evaluate` scores it; bad input is one line."""

import json
import re

import keras
import numpy as np
import pytest
from PIL import Image

from tests.test_cli import TINY, invoke, table2_run  # noqa: F401 - the fixture, shared with test_cli


def stage_model(root, task, init=None):
    """The model.keras of `table2_run`'s stage of `task` (classify: the one from `init` weights)."""
    for result in (root / "work" / "stages").glob(f"{task}-*/result.json"):
        recorded = json.loads(result.read_text())
        if init is None or recorded["settings"]["init"] == init:
            return result.with_name("model.keras")
    raise AssertionError(f"no {task} stage")


def turned_test_images(data_root, folder):
    """Every tiny CIFAR-10 test image (40) in each of its four quarter turns, as PNG files -> {file: (turns, image)}."""
    written = {}
    for path in sorted((data_root / "cifar10" / "test").glob("*/*.png")):
        image = np.asarray(Image.open(path).convert("RGB"))
        for turns in range(4):
            target = folder / f"k{turns}" / f"{path.parent.name}_{path.stem}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.rot90(image, turns)).save(target)
            written[str(target)] = (turns, image)
    return written


def test_predicted_turns_score_as_evaluate_scores_and_upright_turns_them_back_pixel_for_pixel(
        table2_run, data_root, tmp_path):  # noqa: F811
    root, _ = table2_run
    model = stage_model(root, "rotation")
    turned = turned_test_images(data_root, tmp_path / "turned")
    assert len(turned) == 160
    result = invoke("predict", model, tmp_path / "turned", "--json", "--upright", tmp_path / "upright",
                    "--gallery", tmp_path / "gallery.png")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)
    assert {p["image"] for p in predictions} == set(turned)
    correct = [p["quarter_turns"] == turned[p["image"]][0] for p in predictions]
    evaluated = invoke("evaluate", model, "--data-dir", data_root, "--test-images-per-class", "all")
    assert evaluated.exit_code == 0, evaluated.output
    recorded = float(re.search(r"accuracy ([\d.]+)% on 160 rotated", evaluated.output)[1])
    assert round(100 * np.mean(correct), 2) == recorded  # the same 160 samples, the same answers

    for p in predictions:
        turns, original = turned[p["image"]]
        name = p["image"].split("/turned/")[1]
        upright = np.asarray(Image.open(tmp_path / "upright" / name))
        given = np.asarray(Image.open(p["image"]))
        np.testing.assert_array_equal(upright, np.rot90(given, -p["quarter_turns"]))  # turned back, exactly
        if p["quarter_turns"] == turns:
            np.testing.assert_array_equal(upright, original)
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-3
    assert (tmp_path / "gallery.png").read_bytes()[:4] == b"\x89PNG"


def test_a_classifier_names_its_three_likeliest_classes(table2_run, data_root):  # noqa: F811
    root, _ = table2_run
    image = next((data_root / "cifar10" / "test" / "class3").glob("*.png"))
    result = invoke("predict", stage_model(root, "classify", init="rotation"), image, "--json")
    assert result.exit_code == 0, result.output
    (prediction,) = json.loads(result.output)
    assert prediction["task"] == "classify" and len(prediction["top"]) == 3
    assert all(top["class"].startswith("class") for top in prediction["top"])  # the folders' class names
    probabilities = [top["probability"] for top in prediction["top"]]
    assert probabilities == sorted(probabilities, reverse=True)
    table = invoke("predict", stage_model(root, "classify", init="rotation"), image)
    assert table.exit_code == 0 and f"| {image} | {prediction['top'][0]['class']} (" in table.output


def test_a_stage_named_as_kerasrot_show_names_it_is_found_in_the_cache(table2_run, data_root, tmp_path):  # noqa: F811
    root, _ = table2_run
    image = next((data_root / "cifar10" / "test" / "class0").glob("*.png"))
    by_name = invoke("predict", "table2:rotation", image, "--json", "--workdir", root / "work", "--data-dir",
                     data_root, *TINY)
    by_file = invoke("predict", stage_model(root, "rotation"), image, "--json")
    assert by_name.exit_code == 0, by_name.output
    assert json.loads(by_name.output) == json.loads(by_file.output)
    other = invoke("predict", "table2:rotation", image, "--workdir", root / "work", "--data-dir", data_root,
                   *TINY, "--set", "rotation.epochs=5")  # another key: never trained
    assert other.exit_code == 1 and "no trained table2:rotation" in other.output


def test_bad_input_to_predict_is_one_line_and_a_nonzero_exit(table2_run, data_root, tmp_path):  # noqa: F811
    root, _ = table2_run
    rotation = stage_model(root, "rotation")
    (tmp_path / "notes.jpg").write_text("not an image")
    head = keras.Sequential([keras.Input((4, 64)), keras.layers.Flatten(), keras.layers.Dense(10)])
    head.save(tmp_path / "probe.keras")
    image = next((data_root / "cifar10" / "test" / "class0").glob("*.png"))
    for args, message in [
        ((rotation, tmp_path / "missing.png"), "no such image or folder"),
        ((rotation, tmp_path / "notes.jpg"), "cannot read image"),
        ((tmp_path / "probe.keras", image), "neither a rotation model nor a classifier"),
        ((tmp_path / "nothing.keras", image), "does not exist"),
        ((stage_model(root, "classify", init="random"), image, "--upright", tmp_path / "u"), "needs a rotation model"),
        (("table2:nothing", image), "has no stage 'nothing'"),
    ]:
        result = invoke("predict", *args)
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_tensorboard_logs_every_stage_and_the_knn_monitor_records_each_epoch(data_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = invoke("run", "table1", "--data-dir", data_root, "--workdir", tmp_path / "w", "--results",
                    tmp_path / "r", *TINY, "--set", "rotation.epochs=2", "--set", "rotation.knn_monitor=on",
                    "--tensorboard", tmp_path / "tb")
    assert result.exit_code == 0, result.output

    def scalars(folder):
        events = EventAccumulator(str(tmp_path / "tb" / "rotation" / folder))
        events.Reload()
        return {tag: [float(keras.ops.convert_to_numpy(np.frombuffer(e.tensor_proto.tensor_content, "float32")[0])
                            if e.tensor_proto.tensor_content else e.tensor_proto.float_val[0])
                      for e in events.Tensors(tag)] for tag in events.Tags()["tensors"]}

    train, test = scalars("train"), scalars("validation")
    assert len(train["epoch_loss"]) == len(train["epoch_accuracy"]) == len(test["epoch_accuracy"]) == 2
    from tests.test_cli import results_of

    metrics = json.loads((results_of(tmp_path / "r", "table1") / "metrics.json").read_text())
    history = metrics["stages"]["rotation"]["history"]
    assert [round(e["val_accuracy"], 5) for e in history] == [round(v, 5) for v in test["epoch_accuracy"]]
    assert all(0 <= e["knn_accuracy"] <= 1 for e in history) and len(history) == 2
    assert [round(e["knn_accuracy"], 5) for e in history] == [round(v, 5) for v in train["epoch_knn_accuracy"]]
    assert "knn_accuracy" in (results_of(tmp_path / "r", "table1") / "history.csv").read_text().splitlines()[0]
