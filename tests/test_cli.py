"""The command line as a user meets it: a tiny run end to end, and every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kerasrot.runner.cli import main
from tests.conftest import pretend_not_installed

TINY = [
    "--set", "rotation.images_per_class=3", "--set", "rotation.test_images_per_class=2",
    "--set", "rotation.epochs=1", "--set", "rotation.batch_size=8",
    "--set", "rotation.samples_per_epoch=all",  # quick draws 10,000 a rotation epoch
    "--set", "classify.images_per_class=3", "--set", "classify.test_images_per_class=2",
    "--set", "classify.epochs=2", "--set", "classify.batch_size=8",
    # "auto" picks bfloat16 on CPUs with AVX512-BF16, five times slower at this size
    "--set", "rotation.precision=float32", "--set", "classify.precision=float32",
]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def table2_run(data_root, tmp_path_factory):
    """One tiny `kerasrot run table2` shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("run")
    result = invoke("run", "table2", "--data-dir", data_root, "--workdir", root / "work",
                    "--results", root / "results", *TINY)
    assert result.exit_code == 0, result.output
    return root, result


def results_of(results, recipe="table2"):
    """Where a quick run with `--results results` writes `recipe`'s results on this backend."""
    import keras

    from kerasrot.runner.reporting import results_dir

    return results_dir(results, recipe, "quick", keras.backend.backend())


def test_list_names_every_recipe():
    result = invoke("list")
    assert result.exit_code == 0
    for name in ("table1", "table2", "table3", "table4", "figure1", "imagenette", "probes"):
        assert name in result.output


def test_run_writes_metrics_table_history_and_plots(table2_run):
    root, result = table2_run
    out = results_of(root / "results")
    for name in ("metrics.json", "table.md", "history.csv", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"rotation", "last_block.rotation_init", "last_block.random_init"}
    for key in ("command", "backend", "device", "data", "commit", "packages", "wall_seconds"):
        assert metrics["provenance"][key], key
    assert [r["epoch"] for r in metrics["stages"]["last_block.random_init"]["history"]] == [1, 2]
    assert "[stage 3/3]" in result.output and "report B" in (out / "table.md").read_text()


def test_second_run_and_other_recipes_reuse_finished_stages(table2_run, data_root):
    root, _ = table2_run
    first = json.loads((results_of(root / "results") / "metrics.json").read_text())
    same = invoke("run", "table2", "--data-dir", data_root, "--workdir", root / "work",
                  "--results", root / "results", *TINY)
    assert same.exit_code == 0, same.output
    for i, name in enumerate(["rotation", "last_block.rotation_init", "last_block.random_init"], start=1):
        assert f"[stage {i}/3] {name}: done before" in same.output
    assert json.loads((results_of(root / "results") / "metrics.json").read_text())["accuracy"] == first["accuracy"]

    again = invoke("run", "table3", "--data-dir", data_root, "--workdir", root / "work",
                   "--results", root / "results", *TINY)
    assert again.exit_code == 0, again.output
    assert "[stage 1/3] rotation: done before" in again.output
    assert "full.rotation_init: done before" not in again.output


def test_evaluate_reproduces_the_recorded_accuracy(table2_run, data_root):
    root, _ = table2_run
    metrics = json.loads((results_of(root / "results") / "metrics.json").read_text())
    for name, task in (("rotation", "rotation"), ("last_block.rotation_init", "classify")):
        stage = metrics["stages"][name]
        result = invoke("evaluate", stage["checkpoint"], "--data-dir", data_root)
        assert result.exit_code == 0, result.output
        assert f"accuracy {stage['accuracy']:.2f}% on {stage['test_samples']} " in result.output
        assert f"({task};" in result.output


def test_report_redraws_from_metrics_with_the_recipes_citations_as_they_read_now(table2_run):
    root, _ = table2_run
    out = results_of(root / "results")
    (out / "table.md").unlink()
    # A run made before the recipe cited the paper's own numbers (the column "paper (NIN)").
    recorded = (out / "metrics.json").read_bytes()
    older = json.loads(recorded)
    older["reference"] = {name: {"A": ref["A"], "B": ref["B"]} for name, ref in older["reference"].items()}
    older["notes"] = ""
    (out / "metrics.json").write_text(json.dumps(older))
    import keras

    try:
        result = invoke("report", "table2", "--results", root / "results", "--backend", keras.backend.backend())
        assert result.exit_code == 0, result.output
        table = (out / "table.md").read_text()
        assert "| report A | report B | paper (NIN) |" in table
        assert "| 61.17 | 62.09 | 91.16 |" in table  # last_block.rotation_init, from recipes/table2.toml
        assert "the upper anchors we aim past" in table  # the column's legend (recipes/columns.toml)
        assert "72.50 from random weights" in table  # the recipe's notes
        assert json.loads((out / "metrics.json").read_text()) == older  # the run's record is not rewritten
        assert "trained at" not in table  # every stage saw the same input

        # A stage trained on larger images (as imagenette's rotation stage does): each row says its input.
        older["stages"]["rotation"]["settings"].update(image_size=64, stem="cifar")
        (out / "metrics.json").write_text(json.dumps(older))
        result = invoke("report", "table2", "--results", root / "results", "--backend", keras.backend.backend())
        assert result.exit_code == 0, result.output
        table = (out / "table.md").read_text()
        assert "| epochs | trained at |" in table
        assert " | 64x64, CIFAR stem |" in table.split("| rotation |")[1].splitlines()[0]
        classify_size = older["stages"]["last_block.rotation_init"]["settings"]["image_size"]
        assert f" | {classify_size}x{classify_size}, " in table.split("| last_block.rotation_init |")[1].splitlines()[0]
    finally:
        (out / "metrics.json").write_bytes(recorded)


def test_stages_brought_from_another_machine_as_result_json_alone_are_reused_and_named(table2_run, data_root, tmp_path):
    """Merging runs: stage folders copied with their result.json but no model.keras (a GPU lease's small outputs)."""
    root, _ = table2_run
    made = json.loads((results_of(root / "results") / "metrics.json").read_text())["stages"]
    assert made["rotation"]["commit"] and made["rotation"]["device"]  # each stage says what made it
    for stage in made.values():
        source = Path(stage["checkpoint"]).parent
        result = json.loads((source / "result.json").read_text())
        (tmp_path / "work" / "stages" / source.name).mkdir(parents=True)
        (tmp_path / "work" / "stages" / source.name / "result.json").write_text(
            json.dumps({**result, "device": "GPU Elsewhere", "commit": "abc123"}))
    common = ["--data-dir", data_root, "--workdir", tmp_path / "work", "--results", tmp_path / "results", *TINY]

    merged = invoke("run", "table2", *common)
    assert merged.exit_code == 0, merged.output
    assert merged.output.count("done before") == 3
    table = (results_of(tmp_path / "results") / "table.md").read_text()
    assert ("Reused, made by another run: rotation, last_block.rotation_init, last_block.random_init "
            "(GPU Elsewhere, commit abc123).") in table
    earlier = sum(stage["wall_seconds_this_run"] for stage in made.values()) / 60  # what making them took
    assert f"plus {earlier:.1f} min in the earlier runs that made the 3 stages it reused." in table

    # A stage still to run needs the model of the one it starts from: that one trains again, the rest is reused.
    (tmp_path / "work" / "stages" / Path(made["last_block.rotation_init"]["checkpoint"]).parent.name
     / "result.json").unlink()
    again = invoke("run", "table2", *common)
    assert again.exit_code == 0, again.output
    assert "rotation: " in again.output and "which last_block.rotation_init starts from: training it again" \
        in again.output
    assert "[stage 1/3] rotation: test accuracy" in again.output
    assert "[stage 2/3] last_block.rotation_init: test accuracy" in again.output
    assert "[stage 3/3] last_block.random_init: done before" in again.output
    table = (results_of(tmp_path / "results") / "table.md").read_text()
    assert "Reused, made by another run: last_block.random_init (GPU Elsewhere, commit abc123)." in table
    earlier = made["last_block.random_init"]["wall_seconds_this_run"] / 60
    assert f"plus {earlier:.1f} min in the earlier runs that made the 1 stage it reused." in table


def test_run_that_fails_mid_way_leaves_earlier_results_untouched(table2_run, data_root, monkeypatch):
    # The rotation stage is reused from the cache, the next stage trains and fails in its second epoch.
    root, _ = table2_run
    before = {f.name: f.read_bytes() for f in results_of(root / "results").iterdir()}
    result = invoke("run", "table2", "--data-dir", data_root, "--workdir", root / "work",
                    "--results", root / "results", *TINY, "--set", "classify.seed=7",
                    "--set", "classify.schedule=step", "--set", "classify.step_epochs=1",
                    "--set", "classify.step_gamma=1e30")
    assert result.exit_code == 1, result.output
    assert "[stage 1/3] rotation: done before" in result.output
    assert {f.name: f.read_bytes() for f in results_of(root / "results").iterdir()} == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "table9"], "unknown recipe 'table9'"),
        (["run", "table2", "--preset", "fast"], "unknown preset 'fast'"),
        (["run", "table2", "--set", "rotation.epochz=3"], "unknown setting 'epochz'"),
        (["run", "table2", "--set", "rotation.epochs=three"], "expected int"),
        (["run", "table2", "--set", "rotation.epochs=-2"], "at least 1"),
        (["run", "table2", "--set", "classify.batch_size=0"], "at least 1"),
        (["run", "table2", "--set", "rotation.learning_rate=nan"], "learning_rate must be a finite number"),
        (["run", "figure1", "--set", "figure1.labels_per_class=20,abc"], "expected positive integers"),
        (["run", "figure1", "--set", "figure1.labels_per_class=20,-5"], "expected positive integers"),
        (["run", "table2", "--set", "classify.pipeline=fast"], "must be one of memory, tfdata"),
        (["evaluate", "/nonexistent/model.keras", "--dataset", "mnist"], "does not exist"),
        (["run", "table2", "--data-dir", "/nonexistent/data"], "does not exist"),
        (["evaluate", "/nonexistent/model.keras"], "does not exist"),
        (["report", "table2", "--results", "/nonexistent/results"], "no /nonexistent/results"),
    ],
)
def test_bad_input_gets_one_clear_line_and_a_nonzero_exit(args, message):
    result = invoke(*args)
    assert result.exit_code != 0
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_bad_input_in_a_real_process_exits_1_with_one_line_on_stderr(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "kerasrot", "run", "table9", "--workdir", str(tmp_path / "w"),
         "--results", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "unknown recipe 'table9'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r").exists()  # nothing written for a run that never started


def test_wrong_number_of_classes_is_a_clear_error(tmp_path, data_root):
    from tests.conftest import write_image_folders

    write_image_folders(tmp_path / "four", "cifar10", ["train", "test"], 2, 32)
    for name in [f"class{i}" for i in range(4, 10)]:
        for split in ("train", "test"):
            for f in (tmp_path / "four/cifar10" / split / name).iterdir():
                f.unlink()
            (tmp_path / "four/cifar10" / split / name).rmdir()
    result = _tiny_run(tmp_path / "four", tmp_path)
    assert result.exit_code == 1 and "has 4 class folders, cifar10 has 10" in result.stderr

    from kerasrot import models
    from kerasrot.runner import files

    seven = models.build_model("resnet18", 7, stem="imagenet", name="resnet18_classify_cifar10")
    files.save_model(seven, tmp_path / "seven.keras")
    result = invoke("evaluate", tmp_path / "seven.keras", "--data-dir", data_root)
    assert result.exit_code == 1 and "predicts 7 classes, cifar10 has 10" in result.stderr
    assert "Traceback" not in result.output


def _tiny_run(data_dir, root, *extra):
    return invoke("run", "table1", "--data-dir", data_dir, "--workdir", root / "work",
                  "--results", root / "results", *TINY, *extra)


def test_bad_data_folders_get_clear_errors(tmp_path):
    from tests.conftest import write_image_folders

    write_image_folders(tmp_path / "a", "cifar10", ["train"], 3, 32)
    result = _tiny_run(tmp_path / "a", tmp_path)
    assert result.exit_code == 1 and "no folder" in result.output and "cifar10/test" in result.output

    write_image_folders(tmp_path / "b", "cifar10", ["train", "test"], 3, 32, suffix=".jpg")
    for f in (tmp_path / "b/cifar10/test/class5").iterdir():
        f.unlink()
    result = _tiny_run(tmp_path / "b", tmp_path)
    assert result.exit_code == 1 and "class5 holds no" in result.output

    write_image_folders(tmp_path / "c", "cifar10", ["train", "test"], 3, 32, suffix=".jpg")
    (tmp_path / "c/cifar10/train/class1/001.jpg").write_bytes(b"not an image")
    result = _tiny_run(tmp_path / "c", tmp_path)
    assert result.exit_code == 1 and "001.jpg" in result.output and "Traceback" not in result.output


def test_unwritable_results_folder_is_a_clear_error(tmp_path, data_root):
    blocker = tmp_path / "results"
    blocker.write_text("a file where a folder should be")
    result = invoke("run", "table1", "--data-dir", data_root, "--workdir", tmp_path / "w",
                    "--results", blocker / "inside", *TINY)
    assert result.exit_code == 1 and "cannot write to" in result.output


def test_corrupt_checkpoint_and_wrong_task_are_clear_errors(tmp_path, table2_run, data_root):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"PK not really a zip")
    result = invoke("evaluate", bad, "--data-dir", data_root)
    assert result.exit_code == 1 and "not a .keras model file" in result.output

    root, _ = table2_run
    metrics = json.loads((results_of(root / "results") / "metrics.json").read_text())
    classifier = metrics["stages"]["last_block.random_init"]["checkpoint"]
    result = invoke("evaluate", classifier, "--data-dir", data_root, "--dataset", "imagenette")
    assert result.exit_code == 0  # 10 classes either way: allowed, and says which test set
    assert "of imagenette" in result.output


def test_full_disk_mid_run_is_a_clear_error(tmp_path, data_root, monkeypatch):
    import errno

    from kerasrot.runner import files

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "save_model", full)
    result = _tiny_run(data_root, tmp_path)
    assert result.exit_code == 1 and "disk is full" in result.output


def test_second_run_on_the_same_workdir_is_refused(tmp_path, data_root):
    from kerasrot.runner import files

    with files.workdir_lock(tmp_path / "work"):
        result = _tiny_run(data_root, tmp_path)
    assert result.exit_code == 1 and "another kerasrot run is using" in result.output


def test_invalid_backend_is_one_line_without_traceback():
    env = {**os.environ, "KERAS_BACKEND": "bogus"}
    done = subprocess.run([sys.executable, "-m", "kerasrot", "list"], env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert "error: KERAS_BACKEND='bogus' is not supported" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_backend_that_is_not_installed_is_one_line_without_traceback(monkeypatch):
    pretend_not_installed(monkeypatch, "jax")
    result = CliRunner().invoke(main, ["list"], env={"KERAS_BACKEND": "jax"})
    assert result.exit_code == 1
    assert result.output == "error: KERAS_BACKEND=jax, but jax is not installed here: pip install jax " \
                            "(see README.md, Install), or choose another backend\n"


def test_kill_9_mid_run_then_the_same_command_resumes_without_losing_or_repeating_epochs(tmp_path, data_root):
    import signal
    import time

    command = [
        sys.executable, "-m", "kerasrot", "run", "table1", "--data-dir", str(data_root),
        "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
        *TINY, "--set", "rotation.epochs=4", "--set", "rotation.images_per_class=6",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "work").glob("stages/*/checkpoints/training_metadata.json")):
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    state = json.loads(next((tmp_path / "work").glob("stages/*/checkpoints/training_metadata.json")).read_text())
    assert 1 <= state["epoch"] < 4

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"resuming from the checkpoint of epoch {state['epoch']}/4" in second.stdout
    metrics = json.loads((results_of(tmp_path / "results", "table1") / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["stages"]["rotation"]["history"]] == [1, 2, 3, 4]


def test_diverging_stage_stops_with_one_line_keeps_its_checkpoint_and_writes_no_result(tmp_path, data_root):
    # The learning rate is fine for epoch 1 and multiplied by 1e30 from epoch 2 on.
    diverge = ["--set", "rotation.epochs=3", "--set", "rotation.schedule=step", "--set", "rotation.step_epochs=1",
               "--set", "rotation.step_gamma=1e30"]
    result = _tiny_run(data_root, tmp_path, *diverge)
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in result.output
    assert line.startswith("error: stage rotation diverged: the loss became ")
    assert " in epoch 2 (batch " in line and "the checkpoint of epoch 1 stays in " in line
    (stage,) = (tmp_path / "work" / "stages").iterdir()
    assert json.loads((stage / "checkpoints" / "training_metadata.json").read_text())["epoch"] == 1
    assert not (stage / "result.json").exists() and not (stage / "model.keras").exists()
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("metrics.json"))


def test_the_epochs_cell_names_the_images_of_an_epoch_where_it_is_not_one_pass():
    from kerasrot.runner.reporting import _epochs

    assert _epochs({"settings": {"epochs": 8, "samples_per_epoch": 10000}, "train_images": 50000}) == "8 x 10000 images"
    assert _epochs({"settings": {"epochs": 5, "samples_per_epoch": None}, "train_images": 10000}) == "5"


def test_a_copy_without_git_names_its_commit_through_a_manifest_checked_file_by_file(tmp_path):
    """A lent GPU machine gets the tree without .git: the manifest, made where git is, names the commit."""
    from kerasrot.runner.provenance import commit_from_manifest

    repo = tmp_path / "repo"
    (repo / "kerasrot" / "__pycache__").mkdir(parents=True)
    (repo / "recipes").mkdir()
    (repo / "kerasrot" / "models.py").write_text("WIDTH = 64\n")
    (repo / "recipes" / "table1.toml").write_text('title = "t"\n')
    (repo / "kerasrot" / "recipes").symlink_to("../recipes")
    git = ["git", "-C", repo, "-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "one"]):
        subprocess.run(git + command, check=True, capture_output=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout
    listed = subprocess.run(git + ["ls-files", "-s", "--", "kerasrot", "recipes"],
                            check=True, capture_output=True, text=True).stdout
    manifest = tmp_path / "manifest"
    manifest.write_text(head + listed)
    (repo / "kerasrot" / "__pycache__" / "models.cpython-312.pyc").write_bytes(b"\0")  # ignored, as git does
    subprocess.run(["rm", "-rf", repo / ".git"], check=True)

    assert commit_from_manifest(repo, manifest) == head.strip()
    (repo / "kerasrot" / "models.py").write_text("WIDTH = 65\n")
    assert commit_from_manifest(repo, manifest) == head.strip() + "-dirty"
    (repo / "kerasrot" / "models.py").write_text("WIDTH = 64\n")
    (repo / "recipes" / "extra.toml").write_text("")  # a file the commit does not have
    assert commit_from_manifest(repo, manifest) == head.strip() + "-dirty"


def test_a_manifest_wins_over_a_git_checkout_still_at_an_older_commit(tmp_path, monkeypatch):
    """On the GPU machine git sees the session's first commit plus changes; the manifest names the real one."""
    from pathlib import Path

    from kerasrot.runner import provenance

    root = Path(provenance.__file__).resolve().parents[2]
    listed = subprocess.run(["git", "-C", root, "ls-files", "-s", "--", "kerasrot", "recipes"],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("kerasrot is not run from a git checkout")
    manifest = tmp_path / "manifest"
    manifest.write_text("0123abc\n" + listed.stdout)
    monkeypatch.setenv(provenance.MANIFEST_VARIABLE, str(manifest))
    assert provenance.git_commit() in ("0123abc", "0123abc-dirty")  # -dirty while kerasrot/ has changes


def test_an_installed_copy_names_the_commit_it_was_built_from(tmp_path):
    """`pip install .` leaves .git behind: the wheel carries BUILD_COMMIT (setup.py), and a copy without it says so."""
    import zipfile

    import shutil

    from kerasrot import __version__
    from kerasrot.runner import provenance

    root = Path(provenance.__file__).resolve().parents[2]
    if not (root / "setup.py").exists():
        pytest.skip("kerasrot is installed, not run from its source tree")
    clone = tmp_path / "clone"  # the source as it is now, committed in a repository of its own
    clone.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(root / name, clone / name)
    for name in ("recipes", "kerasrot"):
        shutil.copytree(root / name, clone / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "BUILD_COMMIT"))
    git = ["git", "-C", clone, "-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "one"]):
        subprocess.run(git + command, check=True, capture_output=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "wheel", clone],
                   check=True, capture_output=True)
    site = tmp_path / "site"
    with zipfile.ZipFile(next((tmp_path / "wheel").glob("kerasrot-*.whl"))) as wheel:
        wheel.extractall(site)
    ask = [sys.executable, "-c", "from kerasrot.runner import provenance; print(provenance.git_commit())"]

    def commit():
        return subprocess.run(ask, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True,
                              text=True, check=True).stdout.strip()

    assert commit() == f"{head} (installed kerasrot {__version__})"
    (site / "kerasrot" / "BUILD_COMMIT").unlink()  # built from an archive, not a checkout
    assert commit() == f"unknown (installed kerasrot {__version__}, not built from a git checkout)"
