"""Your own images (`folder:PATH`): any layout and format, stable splits, bad files, streaming."""

import json
import os
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from kerasrot import data, folders
from kerasrot.pipeline import Batches
from tests.test_cli import TINY, invoke, results_of


def write_images(folder, count, size=32, suffix=".png", start=0, seed=0):
    """`count` noise images with an up-left mark, as `folder/img<N><suffix>`."""
    rng = np.random.default_rng(seed + start)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        pixels = rng.integers(0, 200, size=(size, size, 3)).astype(np.uint8)
        pixels[: size // 2, : size // 4] = 255
        Image.fromarray(pixels).save(folder / f"img{i:05d}{suffix}")


def as_numpy(x):
    import keras

    return keras.ops.convert_to_numpy(x)


def test_a_folder_nested_any_way_in_any_pillow_format_is_found_and_other_files_left_alone(tmp_path):
    write_images(tmp_path / "a", 3, suffix=".jpg")
    write_images(tmp_path / "a" / "deeper" / "still", 2, size=40, suffix=".webp")
    write_images(tmp_path / "b", 2, size=20, suffix=".bmp", start=10)
    write_images(tmp_path, 1, suffix=".tiff", start=20)
    (tmp_path / "notes.txt").write_text("not an image")
    write_images(tmp_path / ".hidden", 2)
    index = folders.scan(str(tmp_path))
    assert len(index.files) == 8 and not index.bad
    assert index.formats == {"JPEG", "WEBP", "BMP", "TIFF"}
    assert (index.smallest, index.largest) == ((20, 20), (40, 40))
    train = data.load_split(f"folder:{tmp_path}", "train", 24, labelled=False)
    assert len(train) + len(folders.split_files(index, "test")[0]) == 8
    assert train.images.shape[1:] == (24, 24, 3) and set(train.labels) == {0}


def test_held_out_test_images_stay_held_out_as_the_folder_grows(tmp_path):
    write_images(tmp_path / "photos", 300, size=8)
    path = f"folder:{tmp_path / 'photos'}"
    before = data.load_split(path, "test", 8, labelled=False, streaming=True)
    train = data.load_split(path, "train", 8, labelled=False, streaming=True)
    assert 5 <= len(before) <= 30  # one in 20
    assert not set(before.images.paths) & set(train.images.paths)
    write_images(tmp_path / "photos", 300, size=8, start=300)
    after = data.load_split(path, "test", 8, labelled=False, streaming=True)
    assert set(before.images.paths) < set(after.images.paths)


def test_train_and_test_folders_are_the_splits_and_their_first_folders_the_classes(tmp_path):
    for split, count in (("train", 4), ("val", 2)):
        for name in ("cats", "dogs", "owls"):
            write_images(tmp_path / split / name / "nested", count, size=16)
    test = data.load_split(f"folder:{tmp_path}", "test", 16)
    assert test.class_names == ["cats", "dogs", "owls"] and np.bincount(test.labels).tolist() == [2, 2, 2]
    assert len(data.load_split(f"folder:{tmp_path}", "train", 16)) == 12


def test_a_labelled_folder_needs_class_folders(tmp_path):
    write_images(tmp_path / "train", 3, size=8)
    write_images(tmp_path / "test", 3, size=8)
    with pytest.raises(data.DataError, match="is in no class folder"):
        data.load_split(f"folder:{tmp_path}", "test", 8)
    assert len(data.load_split(f"folder:{tmp_path}", "test", 8, labelled=False)) == 3  # rotation needs none


def test_an_unreadable_file_stops_with_its_name_or_is_left_out_and_counted(tmp_path):
    write_images(tmp_path, 40, size=8)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(data.DataError, match=r"1 unreadable image file\(s\): .*broken\.jpg .*bad_images=skip"):
        data.load_split(f"folder:{tmp_path}", "train", 8, labelled=False)
    train = data.load_split(f"folder:{tmp_path}", "train", 8, labelled=False, bad_images="skip")
    test = data.load_split(f"folder:{tmp_path}", "test", 8, labelled=False, bad_images="skip")
    assert len(train) + len(test) == 40
    assert [name for name, _ in train.skipped] == ["broken.jpg"] and "9 images" not in train.source
    assert "40 images, 1 unreadable left out" in train.source


@pytest.mark.parametrize("pipeline", ["memory", "tfdata"])
def test_a_streamed_split_gives_the_same_batches_as_the_split_in_memory(tmp_path, pipeline):
    write_images(tmp_path, 30, size=20, suffix=".jpg")
    path = f"folder:{tmp_path}"
    in_memory = data.load_split(path, "train", 16, labelled=False)
    streamed = data.load_split(path, "train", 16, labelled=False, streaming=True)
    assert isinstance(in_memory.images, np.ndarray) and isinstance(streamed.images, folders.ImageFiles)
    common = dict(batch_size=4, rotations=True, augment=True, shuffle=True, seed=3, epoch_length=12)
    memory_batches = Batches(in_memory.images, in_memory.labels, **common)
    streamed_batches = Batches(streamed.images, streamed.labels, **common)
    for epoch in (0, 1):
        memory_batches.set_epoch(epoch)
        streamed_batches.set_epoch(epoch)
        if pipeline == "tfdata":
            pytest.importorskip("tensorflow")
            got = [x for x, _ in streamed_batches.as_tf_dataset().as_numpy_iterator()]
        else:
            got = [as_numpy(streamed_batches[i][0]) for i in range(len(streamed_batches))]
        for i, x in enumerate(got):
            np.testing.assert_array_equal(as_numpy(memory_batches[i][0]), x)


def _peak_bytes_of_one_epoch(folder, streaming):
    """Peak Python/NumPy memory while loading a split and making one epoch of 64 images' batches."""
    tracemalloc.start()
    split = data.load_split(f"folder:{folder}", "train", 48, labelled=False, streaming=streaming)
    batches = Batches(split.images, split.labels, 16, rotations=True, shuffle=True, epoch_length=64)
    for i in range(len(batches)):
        batches[i]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_streaming_memory_stays_flat_when_the_folder_grows_tenfold(tmp_path):
    write_images(tmp_path / "small", 300, size=8)
    write_images(tmp_path / "large", 3000, size=8)
    small, large = (_peak_bytes_of_one_epoch(tmp_path / name, streaming=True) for name in ("small", "large"))
    in_memory = _peak_bytes_of_one_epoch(tmp_path / "large", streaming=False)
    image = 48 * 48 * 3
    assert in_memory > 3000 * image  # the check can fail: a split in memory holds every image
    # Streamed, the memory grows by the file names, a few dozen bytes a file, not by the images.
    assert (large - small) / 2700 < 0.05 * image, (small, large)


def test_rotation_on_a_streamed_folder_trains_resumes_and_records_the_files_it_left_out(tmp_path, monkeypatch):
    from kerasrot.runner import stages
    from kerasrot.runner.progress import Progress

    write_images(tmp_path / "photos" / "trip", 300, size=24, suffix=".jpg")
    (tmp_path / "photos" / "trip" / "broken.png").write_bytes(b"\x89PNG truncated")
    own = ["--set", f"rotation.dataset=folder:{tmp_path / 'photos'}", "--set", "rotation.streaming=on",
           "--set", "rotation.bad_images=skip", "--set", "rotation.images_per_class=all",
           "--set", "rotation.epochs=3", "--set", "rotation.samples_per_epoch=48"]

    def run(name):
        return invoke("run", "table1", "--workdir", tmp_path / name, "--results", tmp_path / f"results-{name}",
                      *TINY, *own)

    class CrashAfterEpoch2(Progress):  # after BackupAndRestore has saved epoch 2
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            if epoch == 1:
                raise KeyboardInterrupt

    straight = run("straight")
    assert straight.exit_code == 0, straight.output
    assert "left out 1 unreadable image file(s) (bad_images=skip): trip/broken.png" in straight.output
    with monkeypatch.context() as patch:
        patch.setattr(stages, "Progress", CrashAfterEpoch2)
        crashed = run("resumed")
    assert crashed.exit_code == 1 and "run the same command again to resume" in crashed.output
    resumed = run("resumed")
    assert resumed.exit_code == 0 and "resuming from the checkpoint of epoch 2/3" in resumed.output

    def metrics(name):
        return json.loads((results_of(tmp_path / f"results-{name}", "table1") / "metrics.json").read_text())

    a, b = metrics("straight"), metrics("resumed")
    assert [e["epoch"] for e in b["stages"]["rotation"]["history"]] == [1, 2, 3]
    for x, y in zip(a["stages"]["rotation"]["history"], b["stages"]["rotation"]["history"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
    assert a["stages"]["rotation"]["skipped_images"]["count"] == 1
    assert "broken.png" in a["stages"]["rotation"]["skipped_images"]["files"][0]
    assert "streamed from disk" in a["provenance"]["data"]
    assert a["stages"]["rotation"]["settings"]["dataset"] == f"folder:{(tmp_path / 'photos').resolve()}"
    table = results_of(tmp_path / "results-straight", "table1") / "table.md"
    assert f"Own data, in place of the recipe's: rotation on `folder:{(tmp_path / 'photos').resolve()}`" \
        in table.read_text()


def test_a_folder_that_changes_is_trained_again_not_reused(tmp_path):
    write_images(tmp_path / "photos", 24, size=16)
    args = ["run", "table1", "--workdir", tmp_path / "work", "--results", tmp_path / "results", *TINY,
            "--set", f"rotation.dataset=folder:{tmp_path / 'photos'}", "--set", "rotation.images_per_class=all"]
    assert invoke(*args).exit_code == 0
    assert "done before" in invoke(*args).output
    write_images(tmp_path / "photos", 1, size=16, start=24)
    again = invoke(*args)
    assert again.exit_code == 0 and "done before" not in again.output


@pytest.mark.parametrize("value,message", [
    ("folder:", "unknown dataset 'folder:'"),
    ("mnist", "choose one of cifar10, imagenette, folder:PATH"),
    ("folder:/nonexistent/photos", "no folder /nonexistent/photos"),
])
def test_bad_dataset_names_are_one_clear_line(value, message, tmp_path):
    result = invoke("run", "table1", "--workdir", tmp_path, "--set", f"rotation.dataset={value}")
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_any_tfds_name_reads_with_tfds(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        train = data.load_split("tfds:cifar10", "train", 16)
        unlabelled = data.load_split("tfds:cifar10", "test", 16, labelled=False)
    assert train.images.shape == (6, 16, 16, 3) and train.images.dtype == np.uint8
    assert len(train.class_names) == 10 and train.source.startswith("tfds cifar10 ")
    assert set(unlabelled.labels) == {0}
    with pytest.raises(data.DataError, match="streaming reads image folders"):
        data.load_split("tfds:cifar10", "train", 16, streaming=True)


def test_streaming_a_known_dataset_reads_its_image_folder_batch_by_batch(data_root):
    streamed = data.load_split("cifar10", "test", 32, str(data_root), streaming=True)
    in_memory = data.load_split("cifar10", "test", 32, str(data_root))
    assert isinstance(streamed.images, folders.ImageFiles)
    np.testing.assert_array_equal(streamed.images[np.arange(len(streamed))], in_memory.images)
    np.testing.assert_array_equal(streamed.labels, in_memory.labels)
    assert os.path.basename(os.fsdecode(streamed.images.paths[0])) == "000.png"


def test_asking_for_more_test_images_than_a_folder_holds_names_the_setting_to_change(tmp_path):
    write_images(tmp_path / "photos", 40, size=8)
    result = invoke("run", "table1", "--workdir", tmp_path / "work", "--set", f"rotation.dataset=folder:{tmp_path}")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "rotation.test_images_per_class=100: asked for 100 images of class 0, it has " in result.output
    assert "set it lower or to all" in result.output
