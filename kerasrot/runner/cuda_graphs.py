"""CUDA graphs: the PyTorch backend's train and test steps, recorded once and replayed.

Why. Keras on torch runs every step as Python: each layer call, the loss,
the metrics and the optimiser go through Keras' layers of dispatch. For
ResNet18 at 512 samples a step on an H200 is about 10 ms of GPU work but
over 40 ms of Python, and the GPU waits on the host several times per step
(results/benchmarks.md). A CUDA graph records every kernel of one step
once; each later step copies the new batch into the recorded input
buffers and replays the graph: one launch, no Python per layer, no waits.

What capture needs, and how this module provides it:

* Fixed shapes. One graph per input shape; the last, shorter batch of an
  epoch gets its own graph once it has been seen `WARMUP_STEPS` times.
* Warm-up. The first steps of each shape run eagerly (cuDNN chooses its
  algorithms, the optimiser builds its variables), on a side stream, as
  PyTorch's documentation of whole-network capture asks.
* Memory that stays put. Keras updates every variable in place
  (`Variable.assign` copies into its tensor), so the graph's writes are
  the model's: weights, optimiser slots, BatchNorm statistics, metrics.
* No host synchronisation inside the step. Keras 3.15 makes small tensors
  from Python numbers with `torch.as_tensor(number, device="cuda")`, a
  copy from the host that waits for the GPU, and its SGD passes the
  learning-rate tensor as `alpha=`, which PyTorch reads with `.item()`.
  Neither may happen while capturing. `capture_safe()` turns the first
  into fill kernels (the numbers are constants of a step of this shape)
  and the second into a multiply by the tensor. Only while capturing:
  eager Keras is left as it is.
* Logs without waiting. Keras turns each step's logs into Python numbers
  for the callbacks, which waits for the step to finish. A replayed step
  hands back the previous step's logs instead, copied to the host while
  the GPU runs the current one, so the host prepares the next batch in
  the meantime. Epoch logs are unaffected: Keras reads them from the
  metrics' variables at the end of the epoch.

Anything else that cannot be captured (AdamW's update, which asks a
tensor for a Python bool) makes the capture fail; that step shape then
stays eager and the run says so once. Upstream: Keras has no CUDA-graph
path on torch (`jit_compile=True` is `torch.compile`, minutes per model).

`install(model)` puts graphed steps in place of a compiled model's
`train_function` and `test_function`; `model.fit` and `evaluate` then
use them. The portable model saved for users is not affected.
"""

import contextlib
import functools

import keras

WARMUP_STEPS = 3  # eager steps per shape before capturing (PyTorch's examples use 3)


def install(model, log=print, graph_type=None):
    """Replaces a compiled Keras model's train and test steps by graphed ones (torch backend).

    `graph_type` records and replays a step (default `CudaGraph`); tests pass
    a stand-in that runs on a CPU.
    """
    graph_type = graph_type or CudaGraph
    model.make_train_function()
    model.make_test_function()
    model.train_function = GraphedStep(model.train_function, "train", log, graph_type)
    model.test_function = GraphedStep(model.test_function, "test", log, graph_type)
    return model


class GraphedStep:
    """A Keras `one_step_on_data(data) -> logs` function, replayed from a graph per input shape."""

    def __init__(self, step, name, log, graph_type):
        self.step, self.name, self.log, self.graph_type = step, name, log, graph_type
        self.graphs = {}  # input shapes -> recorded graph, or None where capture failed
        self.seen = {}  # input shapes -> eager steps run so far
        self.pending = None  # the last replay's logs, on their way to the host

    def __call__(self, data):
        leaves = [keras.ops.convert_to_tensor(leaf) for leaf in keras.tree.flatten(data)]
        key = tuple((tuple(leaf.shape), leaf.dtype) for leaf in leaves)
        graph = self.graphs.get(key)
        if graph is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if key in self.graphs or self.seen[key] <= WARMUP_STEPS:  # failed before, or still warming up
                self.pending = None
                return self.graph_type.eager(self.step, data)
            graph = self.graphs[key] = self.capture(key, data, leaves)
            if graph is None:
                return self.graph_type.eager(self.step, data)
        for static, leaf in zip(graph.inputs, leaves):
            static.copy_(leaf, non_blocking=True)
        graph.run()
        current = HostLogs(graph.logs)
        previous, self.pending = self.pending, current
        return (previous or current).wait()

    def capture(self, key, data, leaves):
        inputs = [leaf.clone() for leaf in leaves]
        static_data = keras.tree.pack_sequence_as(data, inputs)
        try:
            return self.graph_type(self.step, static_data, inputs)
        except Exception as error:  # e.g. a host read Keras does in this optimiser's step
            self.log(f"CUDA graphs: the {self.name} step for inputs {[s for s, _ in key]} could not be "
                     f"captured ({type(error).__name__}: {str(error).splitlines()[0][:160]}); it runs eagerly")
            return None


class HostLogs:
    """A step's logs (device tensors), copied to pinned host memory without waiting; `wait()` -> numbers."""

    def __init__(self, logs):
        import torch

        def to_host(value):
            return value.to("cpu", non_blocking=True, copy=True) if isinstance(value, torch.Tensor) else value

        self.logs = keras.tree.map_structure(to_host, logs)
        self.done = torch.cuda.Event() if torch.cuda.is_available() else None
        if self.done is not None:
            self.done.record()

    def wait(self):
        if self.done is not None:
            self.done.synchronize()
        return self.logs


class CudaGraph:
    """One step recorded as a `torch.cuda.CUDAGraph`: `inputs` to fill, `run()`, then `logs`."""

    def __init__(self, step, static_data, inputs):
        import torch

        self.inputs = inputs
        self.graph = torch.cuda.CUDAGraph()
        with capture_safe(), torch.cuda.graph(self.graph, stream=side_stream()):
            self.logs = step(static_data)
        # Capture records the step without running it: `GraphedStep` runs it next.

    def run(self):
        self.graph.replay()

    @staticmethod
    def eager(step, data):
        """An ordinary Keras step, on a side stream as PyTorch asks of the steps before a capture."""
        import torch

        side = side_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logs = step(data)
        torch.cuda.current_stream().wait_stream(side)
        return logs


@functools.cache
def side_stream():
    """The one stream that eager warm-up steps and captures run on.

    The same stream for both: autograd remembers the stream on which a
    weight's gradient was first accumulated, and a capture on another
    stream would add waits between the two to the graph.
    """
    import torch

    return torch.cuda.Stream()


@contextlib.contextmanager
def capture_safe():
    """While capturing: Python numbers become fill kernels, and `alpha=` tensors a multiply.

    Inside a Keras step every number that `torch.as_tensor` receives is a
    constant of the step (a batch size, an epsilon, `1` for the iteration
    count), so recording it as a fill kernel is exact. One fill per call,
    never one shared tensor per number: Keras adds into some of them in
    place (PiecewiseConstantDecay's `result_value += ...`). `torch._foreach_add_`
    with a tensor `alpha` (Keras' SGD) becomes `_foreach_add_` of
    `_foreach_mul(other, alpha)`: the same update, without `.item()`.
    """
    import torch

    as_tensor, foreach_add_ = torch.as_tensor, torch._foreach_add_

    def as_tensor_without_copy(data, dtype=None, device=None):
        if not _is_numbers(data):
            return as_tensor(data, dtype=dtype, device=device)
        values, shape = _flatten(data), _shape(data)
        dtype = dtype or _dtype_of(values)
        filled = [torch.full((), value, dtype=dtype, device=device) for value in values]
        if not filled:
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.stack(filled).reshape(shape)

    def foreach_add_without_item(tensors, others, alpha=1):
        if isinstance(alpha, torch.Tensor) and isinstance(others, (list, tuple)):
            return foreach_add_(tensors, torch._foreach_mul(list(others), alpha))
        return foreach_add_(tensors, others, alpha=alpha)

    torch.as_tensor, torch._foreach_add_ = as_tensor_without_copy, foreach_add_without_item
    try:
        yield
    finally:
        torch.as_tensor, torch._foreach_add_ = as_tensor, foreach_add_


def _is_numbers(data):
    if isinstance(data, (list, tuple)):
        return all(_is_numbers(item) for item in data)
    return isinstance(data, (bool, int, float))


def _shape(data):
    if isinstance(data, (list, tuple)):
        return (len(data), *(_shape(data[0]) if data else ()))
    return ()


def _dtype_of(values):
    """The dtype `torch.as_tensor` infers for these Python numbers."""
    import torch

    if all(isinstance(v, bool) for v in values):
        return torch.bool
    if all(isinstance(v, int) for v in values):
        return torch.int64
    return torch.get_default_dtype()


def _flatten(data):
    if isinstance(data, (list, tuple)):
        return [value for item in data for value in _flatten(item)]
    return [data]
