"""CUDA graphs (`kerasrot.runner.cuda_graphs`), checked on a CPU.

A CPU has no CUDA graphs, so the recording itself is checked on a GPU
(benchmarks/throughput.py, `kerasrot run`). What a CPU can check:

* `capture_safe()` leaves no host read in a kerasrot training step (the
  reads that make a capture fail), and changes no result;
* `GraphedStep`'s bookkeeping, with a stand-in "graph" that re-runs the
  recorded step on its input buffers: `fit` trains exactly as without
  it, the batch logs arrive one step late, every recorded step of a
  `fit` reads nothing from the host, and a step that cannot be recorded
  stays eager;
* the host-side batches that torch on a GPU uses equal the usual ones.
"""

import collections

import keras
import numpy as np
import pytest

from kerasrot import models, training
from kerasrot.pipeline import Batches
from kerasrot.runner import cuda_graphs, device, speed
from tests import test_training

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="CUDA graphs are for the torch backend")

SETTINGS = {**test_training.SETTINGS, "learning_rate": 0.002, "epochs": 2}


def _host_reads_mode():
    """A TorchFunctionMode that records each call which would wait for a GPU, or copy from the host into it."""
    import torch
    from torch.overrides import TorchFunctionMode

    reads = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero"}

    class HostReads(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = collections.Counter()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", str(func))
            if name in reads:
                self.calls[name] += 1
            elif name in ("as_tensor", "tensor") and args and not isinstance(args[0], torch.Tensor):
                self.calls[f"{name} of {type(args[0]).__name__}"] += 1
            elif name.startswith("_foreach") and isinstance(kwargs.get("alpha"), torch.Tensor):
                self.calls[f"{name}(alpha=tensor)"] += 1
            return func(*args, **kwargs)

    return HostReads()


def _model(precision="float32", seed=0):
    keras.utils.set_random_seed(seed)
    model = models.build_model("resnet18", 4, "imagenet", 32, data_format="channels_first", dtype=precision)
    return speed.with_fast_layers(model, fused_batchnorm=True)


def _batch(size=8):
    import torch

    rng = np.random.default_rng(0)
    return [(torch.as_tensor(rng.uniform(0, 255, (size, 32, 32, 3)).astype("float32")),
             torch.as_tensor(rng.integers(0, 4, size).astype("int32")))]


@pytest.mark.parametrize("schedule,label_smoothing,clip", [("cosine", 0.0, 0.0), ("step", 0.1, 1e-3)])
def test_capture_safe_leaves_no_host_reads_and_the_same_step(schedule, label_smoothing, clip):
    settings = {**SETTINGS, "schedule": schedule, "step_epochs": [1], "step_gamma": 0.2,
                "label_smoothing": label_smoothing, "global_clipnorm": clip}
    results = {}
    for safe in (False, True):
        model = training.compile_model(_model("mixed_bfloat16"), settings, steps_per_epoch=2)
        model.make_train_function()
        model.train_function(_batch())  # builds the optimiser: not part of a recorded step
        batch, spy = _batch(), _host_reads_mode()
        with (cuda_graphs.capture_safe() if safe else _nothing()), spy:
            logs = model.train_function(batch)
        results[safe] = spy.calls, {k: float(v) for k, v in logs.items()}, [
            keras.ops.convert_to_numpy(w) for w in model.weights]
    assert results[False][0], "the spy sees Keras' own host reads: the test can fail"
    assert not results[True][0], f"host reads left while capturing: {dict(results[True][0])}"
    assert results[True][1] == pytest.approx(results[False][1], rel=1e-6)
    for safe_weight, plain_weight in zip(results[True][2], results[False][2]):
        np.testing.assert_allclose(safe_weight, plain_weight, rtol=1e-5, atol=1e-6)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class ReplayGraph:
    """A CPU stand-in for `CudaGraph`: "replaying" runs the recorded step again on its input buffers."""

    made = 0

    def __init__(self, step, static_data, inputs):
        type(self).made += 1
        self.step, self.static_data, self.inputs, self.logs = step, static_data, inputs, None

    def run(self):
        self.logs = self.step(self.static_data)

    @staticmethod
    def eager(step, data):
        return step(data)


class CheckedGraph(ReplayGraph):
    """As `ReplayGraph`, each run as a capture would see it: `capture_safe`, and no host reads allowed."""

    def run(self):
        spy = _host_reads_mode()
        with cuda_graphs.capture_safe(), spy:
            self.logs = self.step(self.static_data)
        assert not spy.calls, f"a recorded step reads the host: {dict(spy.calls)}"


class FailingGraph(ReplayGraph):
    def __init__(self, step, static_data, inputs):
        raise RuntimeError("operation not permitted when stream is capturing")


class BatchLosses(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(logs["loss"])


def _fit(graph_type, log=print):
    images = np.random.default_rng(1).integers(0, 256, (46, 32, 32, 3), dtype=np.uint8)
    train = Batches(images, np.zeros(46, "int32"), 4, rotations=True, augment=True, shuffle=True)  # last: 2
    test = Batches(images[:12], np.zeros(12, "int32"), 4, rotations=True)
    model = training.compile_model(_model(), SETTINGS, steps_per_epoch=len(train))
    if graph_type:
        cuda_graphs.install(model, log=log, graph_type=graph_type)
    from kerasrot.pipeline import EpochSetter

    losses = BatchLosses()
    history = model.fit(train, validation_data=test, epochs=2, shuffle=False, verbose=0,
                        callbacks=[EpochSetter(train), losses])
    return model, history.history, losses.losses


def test_graphed_fit_trains_as_eager_fit_with_batch_logs_one_step_late():
    ReplayGraph.made = 0
    eager_model, eager_history, eager_losses = _fit(None)
    graphed_model, graphed_history, graphed_losses = _fit(ReplayGraph)
    # Full batches (16 samples) are recorded for training and for testing; the
    # last training batch (8 samples) was seen twice, fewer than WARMUP_STEPS times.
    assert ReplayGraph.made == 2
    assert [shapes[0][0] for shapes in graphed_model.train_function.graphs] == [(16, 32, 32, 3)]
    assert graphed_history == eager_history
    for graphed, eager in zip(graphed_model.weights, eager_model.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(graphed), keras.ops.convert_to_numpy(eager))
    # Batch logs: eager for the first WARMUP_STEPS steps, then each replay
    # reports the step before it; the eager last batch of an epoch ends the
    # lag, and the next replay reports itself.
    warm, per_epoch = cuda_graphs.WARMUP_STEPS, 12
    assert len(graphed_losses) == len(eager_losses) == 2 * per_epoch
    assert graphed_losses[:warm + 1] == eager_losses[:warm + 1]
    assert graphed_losses[warm + 1:per_epoch - 1] == eager_losses[warm:per_epoch - 2]
    assert graphed_losses[per_epoch - 1] == eager_losses[per_epoch - 1]
    assert graphed_losses[per_epoch] == eager_losses[per_epoch]
    assert graphed_losses[per_epoch + 1:-1] == eager_losses[per_epoch:-2]


def test_recorded_steps_of_a_fit_read_nothing_from_the_host():
    CheckedGraph.made = 0
    model, history, losses = _fit(CheckedGraph)  # CheckedGraph.run fails on a host read
    assert CheckedGraph.made == 2
    assert np.all(np.isfinite(history["loss"])) and np.all(np.isfinite(history["val_loss"]))


def test_a_step_that_cannot_be_recorded_stays_eager_and_says_so_once():
    said = []
    eager_model, eager_history, _ = _fit(None)
    model, history, _ = _fit(FailingGraph, log=said.append)
    assert len(said) == 2 and all("could not be captured" in line and "runs eagerly" in line for line in said)
    assert {"train", "test"} == {line.split()[3] for line in said}
    for key in eager_history:
        np.testing.assert_allclose(history[key], eager_history[key], rtol=1e-5, atol=1e-6)


def test_host_side_batches_equal_device_side_batches():
    images = np.random.default_rng(2).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    for rotations in (True, False):
        batches = Batches(images, np.arange(20) % 3, 8, rotations=rotations, augment=True, shuffle=True, seed=3)
        device_side = [tuple(keras.ops.convert_to_numpy(a) for a in batches[i]) for i in range(len(batches))]
        on_host = device.HostBatches(batches)  # what torch on a CUDA GPU feeds, without the copy to the GPU
        with keras.device("cpu"):
            host_side = [tuple(keras.ops.convert_to_numpy(a) for a in on_host.batches[i]) for i in range(len(on_host))]
        for (x1, y1), (x2, y2) in zip(device_side, host_side):
            assert x1.dtype == x2.dtype == np.float32
            np.testing.assert_array_equal(x1, x2)
            np.testing.assert_array_equal(y1, y2)


def test_cuda_graphs_resolve_on_only_with_torch_on_a_gpu():
    settings = {"data_format": "auto", "precision": "auto", "jit_compile": "auto", "cuda_graphs": "on"}
    assert speed.resolve(settings)["cuda_graphs"] == "off"  # no GPU here
    assert speed.resolve({**settings, "cuda_graphs": "auto"})["cuda_graphs"] == "off"


def _gpu_stage(settings):
    """test_training's tiny stage, built as torch on a GPU builds it: NCHW, fused BatchNorm, out-major kernels,
    its steps recorded (`speed.prepare_to_train`)."""
    model, train, test = test_training._fresh_stage()
    fast = models.build_model("resnet18", 4, stem="imagenet", data_format="channels_first")
    fast = speed.with_fast_layers(fast, fused_batchnorm=True, channels_last_kernels=True)
    fast.set_weights(model.get_weights())
    training.compile_model(fast, settings, steps_per_epoch=len(train))
    return speed.prepare_to_train(fast, settings), train, test


def test_on_a_gpu_torch_records_its_steps_and_keeps_its_kernels_out_major(monkeypatch):
    from kerasrot.runner import device

    monkeypatch.setattr(device, "has_gpu", lambda: True)
    chosen = speed.resolve({"data_format": "auto", "precision": "auto", "fused_batchnorm": "auto",
                            "channels_last_kernels": "auto", "jit_compile": "auto", "cuda_graphs": "auto"})
    assert chosen == {"data_format": "channels_first", "precision": "mixed_bfloat16", "fused_batchnorm": "on",
                      "channels_last_kernels": "on", "jit_compile": "off", "cuda_graphs": "on"}


def test_a_graphed_stage_resumes_exactly(tmp_path, monkeypatch):
    """Killed after epoch 2 of 3 and started again, a stage with recorded steps ends as one run straight through."""
    monkeypatch.setattr(cuda_graphs, "CudaGraph", ReplayGraph)  # what speed.prepare_to_train installs, on a CPU
    settings = {**test_training.SETTINGS, "epochs": 3, "cuda_graphs": "on", "channels_last_kernels": "on"}
    straight, train, test = _gpu_stage(settings)
    straight_history = training.train(straight, train, test, settings, tmp_path / "straight")
    assert isinstance(straight.train_function, cuda_graphs.GraphedStep)
    with pytest.raises(KeyboardInterrupt):
        training.train(*_gpu_stage(settings), settings, tmp_path / "killed",
                       callbacks=[test_training.StopAfter(2)])
    resumed, train, test = _gpu_stage(settings)
    history = training.train(resumed, train, test, settings, tmp_path / "killed")
    assert [record["loss"] for record in history] == [record["loss"] for record in straight_history]
    for x, y in zip(resumed.weights, straight.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(x), keras.ops.convert_to_numpy(y))
    # The restored momentum kept the out-major layout of its kernel (speed.lay_out_slots_like_variables).
    optimizer = resumed.optimizer
    for variable in resumed.trainable_variables:
        slot = optimizer.momentums[optimizer._get_variable_index(variable)]
        assert slot.value.stride() == variable.value.stride(), variable.path