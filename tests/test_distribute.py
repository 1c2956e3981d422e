"""Data parallelism (`kerasrot run --data-parallel`, kerasrot/runner/distribute.py).

Keras' `keras.distribution.DataParallel` runs on the JAX backend only, and
JAX fixes its devices when it is first used: the two "devices" of a CPU
(`XLA_FLAGS=--xla_force_host_platform_device_count=2`) must be asked for
before JAX is imported. So the JAX checks run in a fresh Python process,
whatever backend runs this file; the other tests run in this one.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from kerasrot.runner.cli import main
from tests.test_cli import TINY

ROOT = Path(__file__).resolve().parents[1]
# The checks that run JAX itself; on a torch-only install (README's Tests) they skip.
needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")
TWO_CPU_DEVICES = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def run_on_two_jax_devices(code, directory, env=(), timeout=300):
    """Runs `code` in `directory`, in a new Python process with the JAX backend and two CPU devices -> its stdout."""
    env = {**os.environ, **TWO_CPU_DEVICES, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **dict(env)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=directory,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


# One process, four short trainings of the same tiny rotation stage: on one
# device, on two, and on two interrupted after epoch 2 and resumed. A small
# learning rate keeps the trajectories from amplifying rounding differences
# (the sums over devices add in another order). ResNet18 on ten images needs
# a ten times smaller one: at 0.001 a 1e-7 nudge of its starting weights moved
# its third-epoch loss by 3% on one device, and on an Intel Xeon two devices
# drifted 1% from one (an AMD EPYC's rounding happened to agree); at 0.0001
# they agree within 1e-6, while a doubled learning rate still moves the loss
# 9%. The small convnet agrees within 1e-7 at 0.001, where a doubled rate
# moves its loss 0.14% (at 0.0001 only 0.014%, too close to the tolerance).
# The compilation cache lets the three two-device trainings compile their
# steps once.
SAME_TRAINING = """
    import json
    import keras
    import numpy as np
    from kerasrot import models, training
    from kerasrot.pipeline import Batches
    from kerasrot.runner import distribute
    from tests.test_training import SETTINGS as TRAINING_SETTINGS, StopAfter

    LEARNING_RATE = {"small": 0.001, "resnet18": 0.0001}["MODEL"]
    SETTINGS = {**TRAINING_SETTINGS, "epochs": 3, "learning_rate": LEARNING_RATE, "step_epochs": [], "jit_compile": "on"}

    def network():
        if "MODEL" == "resnet18":
            return models.build_model("resnet18", 4, stem="imagenet")
        layers = keras.layers  # a small convnet with BatchNorm: the same mechanics, compiled in seconds
        return keras.Sequential([keras.Input((32, 32, 3)), layers.Rescaling(1 / 255), layers.Conv2D(8, 3, 2),
                                 layers.BatchNormalization(), layers.ReLU(), layers.GlobalAveragePooling2D(),
                                 layers.Dense(4)])

    def stage():
        keras.utils.set_random_seed(0)
        images = np.random.default_rng(0).integers(0, 255, size=(10, 32, 32, 3)).astype("uint8")
        train = Batches(images, np.zeros(10), 4, rotations=True, augment=True, shuffle=True, seed=1)  # 4+4+2 images
        test = Batches(images[:6], np.zeros(6), 4, rotations=True)  # 4+2
        return network(), train, test

    def weights(model):
        return [keras.ops.convert_to_numpy(w) for w in model.weights]  # BatchNorm's moving statistics too

    def largest_difference(a, b):
        return max(float(np.max(np.abs(x - y) / (1 + np.abs(x)))) for x, y in zip(weights(a), weights(b)))

    def train(directory, callbacks=(), log=print):
        model, train_batches, test_batches = stage()
        training.compile_model(model, SETTINGS, steps_per_epoch=len(train_batches))
        history = training.train(model, train_batches, test_batches, SETTINGS, directory, callbacks, log=log)
        return model, history, training.accuracy(model, test_batches)

    out = {"one": distribute.description()}
    one, one_history, one_accuracy = train("one")
    out["devices"] = distribute.data_parallel(True)
    two, two_history, two_accuracy = train("two")
    out["replicated_on"] = len(two.weights[0].value.sharding.device_set)
    try:
        train("resumed", callbacks=[StopAfter(2)])
    except KeyboardInterrupt:
        pass
    logged = []
    resumed, resumed_history, _ = train("resumed", log=logged.append)
    out["logged"] = logged
    out["losses"] = [[r["loss"] for r in h] for h in (one_history, two_history, resumed_history)]
    out["val_losses"] = [[r["val_loss"] for r in h] for h in (one_history, two_history)]
    out["accuracy"] = [one_accuracy, two_accuracy]
    out["weights_one_vs_two"] = largest_difference(one, two)
    out["weights_two_vs_resumed"] = largest_difference(two, resumed)
    print(json.dumps(out))
"""


def same_training(model, directory):
    """The trainings of SAME_TRAINING with `model` ("small" or "resnet18") -> what they measured."""
    env = {"JAX_COMPILATION_CACHE_DIR": str(directory / "jax-cache")}
    out = run_on_two_jax_devices(SAME_TRAINING.replace("MODEL", model), directory, env=env)
    return json.loads(out.strip().splitlines()[-1])


def check_same_training(out):
    assert out["one"] == "1 device"
    assert out["devices"] == "2 devices (cpu), keras.distribution.DataParallel"
    assert out["replicated_on"] == 2  # every weight has a copy on both devices
    one, two, resumed = out["losses"]
    # Two devices follow one: same global batch, same learning rate, BatchNorm over the whole batch.
    assert two == pytest.approx(one, rel=1e-4)
    assert out["val_losses"][1] == pytest.approx(out["val_losses"][0], rel=1e-4)
    assert out["accuracy"][1] == pytest.approx(out["accuracy"][0])
    assert out["weights_one_vs_two"] < 1e-3
    # Interrupted after epoch 2 and resumed from BackupAndRestore's checkpoint: as if never stopped.
    assert out["logged"] == ["resuming from the checkpoint of epoch 2/3"]
    assert resumed == pytest.approx(two, rel=1e-6)
    assert out["weights_two_vs_resumed"] < 1e-6


@needs_jax
def test_two_devices_train_like_one_and_resume_like_an_uninterrupted_run(tmp_path):
    check_same_training(same_training("small", tmp_path))


@needs_jax
@pytest.mark.slow
def test_two_devices_train_a_resnet18_like_one_and_resume_it(tmp_path):
    check_same_training(same_training("resnet18", tmp_path))


@needs_jax
def test_batchnorm_statistics_are_those_of_the_whole_batch(tmp_path):
    # Each device holds half of the batch, 0, 0 on one and 10, 10 on the other.
    # After one step with momentum 0 the moving statistics are the batch's:
    # mean 5, variance 25 (each half alone: variance 0).
    out = run_on_two_jax_devices("""
        import keras, numpy as np
        from kerasrot.runner import distribute
        distribute.data_parallel(True)
        model = keras.Sequential([keras.Input((1,)), keras.layers.BatchNormalization(momentum=0.0)])
        model.compile(optimizer="sgd", loss="mse")
        x = np.array([[0.0], [0.0], [10.0], [10.0]])
        model.train_on_batch(x, x)
        layer = model.layers[0]
        print(*[float(keras.ops.convert_to_numpy(v)[0]) for v in (layer.moving_mean, layer.moving_variance)])
    """, tmp_path)
    mean, variance = map(float, out.strip().splitlines()[-1].split())
    assert mean == pytest.approx(5.0) and variance == pytest.approx(25.0)


@needs_jax
def test_last_batches_that_do_not_split_are_named(tmp_path):
    out = run_on_two_jax_devices("""
        import numpy as np
        from kerasrot.pipeline import Batches
        from kerasrot.runner import distribute
        from kerasrot.runner.config import Stage
        distribute.data_parallel(True)
        stage = Stage("last_block.random_init", "classify", {"batch_size": 4})
        images = np.zeros((10, 32, 32, 3), "uint8")
        distribute.check_batches(stage, Batches(images, np.zeros(10), 4, shuffle=True))  # 4 + 4 + 2 split
        distribute.check_batches(stage, Batches(images[:9], np.zeros(9), 4, rotations=True))  # 1 image, 4 samples
        try:
            distribute.check_batches(stage, Batches(images[:9], np.zeros(9), 4))  # 4 + 4 + 1
        except distribute.DistributeError as error:
            print(error)
    """, tmp_path)
    assert "the last batch of stage last_block.random_init's 9 test images holds 1 (1 samples)" in out
    assert "change classify.batch_size" in out


@needs_jax
def test_two_processes_connect_and_share_one_batch(tmp_path):
    # Two hosts, played by two processes on this machine with one CPU device
    # each: keras.distribution.initialize() connects them through the
    # KERAS_DISTRIBUTION_* variables (JAX's Gloo collectives on a CPU). Each
    # process feeds its half of the batch; BatchNorm sees the whole batch.
    code = textwrap.dedent("""
        import keras, numpy as np
        from kerasrot.runner import distribute
        described = distribute.data_parallel(True)
        index, count = distribute.process_shard()
        model = keras.Sequential([keras.Input((1,)), keras.layers.BatchNormalization(momentum=0.0)])
        model.compile(optimizer="sgd", loss="mse")
        half = np.array([[0.0], [2.0], [10.0], [12.0]])[2 * index:2 * index + 2]
        model.train_on_batch(half, half)
        layer = model.layers[0]
        print(described, "|", index, count, *[float(keras.ops.convert_to_numpy(v)[0])
                                              for v in (layer.moving_mean, layer.moving_variance)])
    """)
    with socket.socket() as free:
        free.bind(("localhost", 0))
        port = free.getsockname()[1]
    processes = []
    for index in range(2):
        env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2",
               "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"localhost:{port}", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
               "KERAS_DISTRIBUTION_PROCESS_ID": str(index)}
        env.pop("XLA_FLAGS", None)
        processes.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        ends = [process.communicate(timeout=120) for process in processes]
    finally:  # one that failed leaves the other waiting for it
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for index, (process, (stdout, stderr)) in enumerate(zip(processes, ends)):
        assert process.returncode == 0, stdout[-2000:] + stderr[-2000:]
        described, numbers = stdout.strip().splitlines()[-1].split(" | ")
        assert described == "2 devices (cpu) on 2 processes, keras.distribution.DataParallel"
        found, count, mean, variance = numbers.split()
        assert (int(found), int(count)) == (index, 2)
        assert float(mean) == pytest.approx(6.0) and float(variance) == pytest.approx(26.0)  # of 0, 2, 10, 12


@needs_jax
def test_cli_run_records_the_two_devices(data_root, tmp_path):
    command = [sys.executable, "-m", "kerasrot", "run", "table1", "--data-parallel", "--data-dir", str(data_root),
               "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "results"), *TINY]
    env = {**os.environ, **TWO_CPU_DEVICES}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first_line = done.stdout.splitlines()[0]
    assert "backend jax" in first_line and "2 JAX devices, data-parallel" in first_line
    out = tmp_path / "results" / "table1" / "quick-jax"
    metrics = json.loads((out / "metrics.json").read_text())
    provenance = metrics["provenance"]
    assert provenance["devices"] == "2 devices (cpu), keras.distribution.DataParallel"
    assert provenance["device"].endswith("; 2 JAX devices, data-parallel")
    stage_results = metrics["stages"].values()  # each stage's result.json, as run_recipe returned it
    assert stage_results and all((r["device"], r["devices"]) == (provenance["device"], provenance["devices"])
                                 for r in stage_results)  # each stage records them too
    assert "--data-parallel" in provenance["command"]
    assert provenance["command"].startswith("KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 ")
    assert "2 JAX devices, data-parallel" in (out / "table.md").read_text()


@needs_jax
def test_batch_that_does_not_split_is_one_line_naming_the_setting(data_root, tmp_path):
    command = [sys.executable, "-m", "kerasrot", "run", "table2", "--data-parallel", "--data-dir", str(data_root),
               "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "results"), *TINY,
               "--set", "classify.batch_size=7"]
    env = {**os.environ, **TWO_CPU_DEVICES}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "classify.batch_size=7" in done.stderr and "2 devices" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "work" / "stages").exists()


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_other_backends_refuse_with_one_line_naming_the_jax_route(backend, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "kerasrot", "run", "table1", "--data-parallel",
         "--workdir", str(tmp_path / "w"), "--results", str(tmp_path / "r")],
        env={**os.environ, "KERAS_BACKEND": backend}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "KERAS_BACKEND=jax kerasrot run ... --data-parallel" in done.stderr
    assert "keras-team/keras#23316" in done.stderr and "Traceback" not in done.stderr


def test_refusal_in_this_process_when_its_backend_is_not_jax():
    import keras

    if keras.backend.backend() == "jax":
        pytest.skip("this process runs JAX: the refusal is tested in subprocesses above")
    result = CliRunner().invoke(main, ["run", "table1", "--data-parallel"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: --data-parallel needs the JAX backend")
    assert len(result.stderr.strip().splitlines()) == 1


def test_one_device_without_the_flag_and_the_checks_of_batch_sizes():
    from kerasrot.runner import distribute, provenance, reporting
    from kerasrot.runner.config import Stage

    assert distribute.description() == "1 device"
    assert distribute.device_count() == 1 and distribute.process_shard() == (0, 1)
    distribute.check_batch_sizes([Stage("rotation", "rotation", {"batch_size": 7})])  # any size splits over one
    prov = provenance.record("kerasrot run table1", "torch", "CPU x", "tfds", 1.0, [], "abc")
    assert prov["devices"] == "1 device"
    assert reporting._data_parallel(prov) == ""
    assert reporting._data_parallel({**prov, "devices": "16 devices (gpu) on 2 processes, "
                                     "keras.distribution.DataParallel"}).startswith("; data-parallel over 16 devices")
