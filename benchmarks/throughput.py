"""Throughput of kerasrot's input pipeline and training step, against plain PyTorch.

Run by hand, on whatever device is there (a CUDA GPU is picked when present):

    python benchmarks/throughput.py --quick
    python benchmarks/throughput.py --networks resnet18-cifar --variants cl,cf,cf+fbn
    KERAS_BACKEND=jax python benchmarks/throughput.py --skip-pipeline

It prints one Markdown table:

1. the input pipeline alone: batches per second of B images, each padded by 4,
   randomly cropped back and randomly flipped, then expanded to its 4 exact
   rot90 copies (4B samples, labels 0-3), from a synthetic uint8 CIFAR-10-like
   array (50000, 32, 32, 3), through `kerasrot.pipeline.Batches` (memory, tfdata);
2. training samples/s (rotated samples, 4B per step) of `kerasrot.models`
   networks compiled as RotNet trains them (SGD, Nesterov momentum 0.9, sparse
   categorical cross-entropy from logits), one `train_on_batch` (or `fit`) step;
3. the same network, batch and precision in plain PyTorch
   (`torch_reference.py`): fp32, and bf16 under `torch.autocast` where Keras
   runs `mixed_bfloat16`;
4. the ratio Keras/PyTorch, also printed as `ratio keras/pytorch: X.XX` lines.

Keras variants (`--variants`, comma separated; tokens joined with `+`):
    cl / cf   image_data_format channels_last / channels_first
    fbn       fused BatchNorm (kerasrot.runner.speed.FusedBatchNormalization,
              torch.native_batch_norm; the recipes' default on torch)
    clk       conv kernels in channels_last memory
              (kerasrot.runner.speed.ChannelsLastKernelConv2D; the default on a CPU with torch)
    graph     train step recorded as a CUDA graph and replayed
              (kerasrot.runner.cuda_graphs; the default on torch with a GPU)
    jit       compile(jit_compile=True) (torch.compile on torch: minutes!)
    fit       time model.fit over --steps steps instead of train_on_batch, the
              batch already on the device (as `kerasrot run` trains)
    speN      steps_per_execution=N (implies fit)
Each timed unit is --steps steps followed by one wait for the device, for
Keras and PyTorch alike. Every repeat times one unit of every variant and
of PyTorch in turn (interleaved), so load from other processes hits all of
them alike; the numbers are medians over the repeats, after warm-up units
that are not timed.

The PyTorch reference (`torch_reference.py`) is the strongest eager
PyTorch: channels_last memory format under bf16 autocast on a GPU, and on
a CPU whichever of NCHW contiguous and channels_last is faster
(--torch-memory-format); `--torch-compile` adds a torch.compile row.
`--headline VARIANT` prints `<gpu|cpu> ratio keras-<backend>/pytorch-eager:
X.XX` for that variant, against the first PyTorch row.
"""

import argparse
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # jax beside torch on a GPU
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# kerasrot first: importing it sets its TensorFlow oneDNN default before Keras imports TensorFlow.
from kerasrot.runner import device  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from kerasrot.models import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from kerasrot.rotations import NUM_ROTATIONS  # noqa: E402

NETWORKS = {
    "resnet18-imagenet": ("resnet18", "imagenet"),
    "resnet18-cifar": ("resnet18", "cifar"),
    "densenet121-imagenet": ("densenet121", "imagenet"),
    "densenet121-cifar": ("densenet121", "cifar"),  # slow on a CPU
}
DEFAULT_NETWORKS = "resnet18-imagenet,resnet18-cifar,densenet121-imagenet"


# ---------------------------------------------------------------------------
# Device and provenance
# ---------------------------------------------------------------------------


def torch_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_line():
    cpu = device.cpu_description()
    return f"GPU {device.gpu_name()} (host: {cpu})" if gpu() else f"CPU {cpu}"


def versions_line():
    parts = [f"backend {keras.backend.backend()}", f"keras {keras.__version__}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        parts.append("torch absent")
    parts.append(f"python {platform.python_version()}")
    return ", ".join(parts)


def gpu():
    return device.has_gpu()


def sync():
    """Waits for queued device work of the backend, so that timings are complete."""
    backend = keras.backend.backend()
    if backend == "torch":
        sync_torch()
    elif backend == "jax":
        import jax

        jax.effects_barrier()
        for array in jax.live_arrays():
            array.block_until_ready()


# ---------------------------------------------------------------------------
# (1) Input pipeline
# ---------------------------------------------------------------------------


def synthetic_cifar(num_images=50000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(num_images, 32, 32, 3), dtype=np.uint8)


def make_batches(images, batch_size, pipeline="memory", num_batches=10, seed=0):
    """Yields `num_batches` (x, y) of `kerasrot.pipeline.Batches`, as a rotation stage gets them:
    x `[4B, H, W, 3]` float32 0-255 (augmented, then rotated), y `[4B]` int32."""
    from kerasrot.pipeline import Batches

    batches = Batches(
        images,
        np.zeros(len(images), "int32"),
        batch_size,
        rotations=True,
        augment=True,
        shuffle=True,
        seed=seed,
        epoch_length=batch_size * num_batches,
    )
    if pipeline == "tfdata":
        yield from batches.as_tf_dataset()
    else:
        for i in range(num_batches):
            yield batches[i]


def bench_pipeline(pipeline, images, batch_size, num_batches, repeats):
    """Median batches/s over `repeats` passes of `num_batches` (first pass: warm-up)."""
    rates = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        for x, y in make_batches(images, batch_size, pipeline, num_batches, seed=r):
            pass
        sync()
        if r:
            rates.append(num_batches / (time.perf_counter() - start))
    return statistics.median(rates)


# ---------------------------------------------------------------------------
# (2) Keras training step
# ---------------------------------------------------------------------------


class Variant:
    """One Keras configuration, parsed from e.g. `cf+fbn` or `cl+spe4`."""

    def __init__(self, text):
        self.text = text
        tokens = text.split("+")
        self.data_format = {"cl": "channels_last", "cf": "channels_first"}[tokens[0]]
        self.fused_bn = "fbn" in tokens
        self.channels_last_kernels = "clk" in tokens
        self.jit = "jit" in tokens
        self.graph = "graph" in tokens
        self.spe = 1
        for t in tokens[1:]:
            if t.startswith("spe"):
                self.spe = int(t[3:])
            elif t not in ("fbn", "clk", "jit", "fit", "graph"):
                raise ValueError(f"unknown variant token {t!r} in {text!r}")
        self.fit = "fit" in tokens or self.spe > 1


def build_keras(arch, stem, variant, precision, lr=0.01):
    from kerasrot import models
    from kerasrot.runner import speed

    model = models.build_model(arch, NUM_ROTATIONS, stem, 32, data_format=variant.data_format, dtype=precision)
    model = speed.with_fast_layers(model, fused_batchnorm=variant.fused_bn,
                                   channels_last_kernels=variant.channels_last_kernels)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # Only the `jit` token compiles: Keras' "auto" would pick XLA on TensorFlow,
        # which kerasrot's runs do not use (jit_compile "auto" is on for JAX only).
        jit_compile=bool(variant.jit),
        steps_per_execution=variant.spe,
    )
    if variant.channels_last_kernels:  # as kerasrot.runner.speed.prepare_to_train does
        speed.lay_out_slots_like_variables(model.optimizer)
    if variant.graph:
        from kerasrot.runner import cuda_graphs

        cuda_graphs.install(model)
    return model


class SameBatch(keras.utils.PyDataset):
    """`steps` batches, all the same device-resident batch: `fit` with no input cost."""

    def __init__(self, x, y, steps):
        super().__init__()
        self.x, self.y, self.steps = x, y, steps

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        return self.x, self.y


class KerasStep:
    """One timed unit of Keras training (`steps` steps, then a wait); `__call__` returns seconds per step."""

    def __init__(self, model, variant, x, y, steps):
        self.model, self.variant = model, variant
        self.x, self.y = ops.convert_to_tensor(x), ops.convert_to_tensor(y)
        self.steps = max(steps, variant.spe)
        self.steps -= self.steps % variant.spe
        self.batches = SameBatch(self.x, self.y, self.steps) if variant.fit else None

    def __call__(self):
        start = time.perf_counter()
        if self.variant.fit:
            self.model.fit(self.batches, epochs=1, shuffle=False, verbose=0)
        else:
            for _ in range(self.steps):
                self.model.train_on_batch(self.x, self.y)
        sync()
        return (time.perf_counter() - start) / self.steps


# ---------------------------------------------------------------------------
# (3) Plain PyTorch
# ---------------------------------------------------------------------------


class TorchStep:
    """The same network in plain PyTorch, fed the same NHWC 0-255 batch; `steps` steps, then a wait."""

    def __init__(self, arch, stem, precision, x, y, steps, lr=0.01, memory_format="contiguous", compiled=False):
        import torch

        import torch_reference

        self.torch, self.steps = torch, steps
        self.device = torch_device()
        net = torch_reference.NETWORKS[arch](NUM_ROTATIONS, stem).to(self.device)
        self.memory_format = (
            torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
        )
        self.net = net.to(memory_format=self.memory_format)
        self.opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True)
        self.x = torch.as_tensor(np.asarray(x), device=self.device)
        self.y = torch.as_tensor(np.asarray(y), device=self.device).long()
        self.mean = torch.tensor(CIFAR10_MEAN, device=self.device)
        self.std = torch.tensor(CIFAR10_STD, device=self.device)
        self.bf16 = precision == "mixed_bfloat16"
        self.run_step = torch.compile(self.step) if compiled else self.step

    def step(self):
        torch = self.torch
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
            # The preprocessing the Keras models do inside: normalise, to NCHW.
            x = ((self.x - self.mean) / self.std).permute(0, 3, 1, 2)
            x = x.contiguous(memory_format=self.memory_format)
            loss = torch.nn.functional.cross_entropy(self.net(x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def __call__(self):
        start = time.perf_counter()
        for _ in range(self.steps):
            self.run_step()
        sync_torch()
        return (time.perf_counter() - start) / self.steps


def sync_torch():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------
# Profiling
# ---------------------------------------------------------------------------


def profile(label, fn, rows):
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    with torch.profiler.profile(activities=activities) as prof:
        fn()
    print(f"\n#### profile: {label}\n")
    print(prof.key_averages().table(sort_by=sort, row_limit=rows))


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats/networks, for a smoke run")
    p.add_argument("--networks", default=None, help=f"comma list of {sorted(NETWORKS)}")
    p.add_argument("--batch", type=int, default=128, help="images per batch (x4 rotations)")
    p.add_argument("--variants", default=None, help="Keras variants, e.g. cl,cf,cf+fbn")
    p.add_argument("--precisions", default="float32", help="float32,mixed_bfloat16")
    p.add_argument("--repeats", type=int, default=None, help="timed units per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed units per variant")
    p.add_argument("--steps", type=int, default=None, help="steps per timed unit (default 1 on a CPU, 20 on a GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--torch-memory-format", default=None, choices=["contiguous", "channels_last"],
                   help="default: channels_last on a GPU, contiguous on a CPU")
    p.add_argument("--torch-compile", action="store_true", help="add a torch.compile row (PyTorch reference)")
    p.add_argument("--headline", default=None, help="variant for the `<gpu|cpu> ratio keras-<backend>/...` line")
    p.add_argument("--pipelines", default="memory,tfdata", help="kerasrot pipelines: memory,tfdata")
    p.add_argument("--pipeline-batches", type=int, default=20)
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--profile", action="store_true", help="torch.profiler table per variant")
    p.add_argument("--profile-rows", type=int, default=18)
    args = p.parse_args(argv)
    backend = keras.backend.backend()
    if args.networks is None:
        args.networks = "resnet18-imagenet" if args.quick else DEFAULT_NETWORKS
    if args.variants is None:
        args.variants = "cl,cf+fbn" if backend == "torch" else "cl"
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.steps is None:
        args.steps = 20 if gpu() else 1
    if args.torch_memory_format is None:
        args.torch_memory_format = "channels_last" if gpu() else "contiguous"
    if args.quick:
        args.warmup = min(args.warmup, 1)
        args.pipeline_batches = min(args.pipeline_batches, 5)
    return args


def main(argv=None):
    args = parse_args(argv)
    backend = keras.backend.backend()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(f"device: {device_line()}")
    print(f"versions: {versions_line()}")
    print(
        f"batch: {args.batch} images x {NUM_ROTATIONS} rotations = "
        f"{args.batch * NUM_ROTATIONS} samples; medians of {args.repeats} repeats of {args.steps} step(s) "
        f"after {args.warmup} warm-up units; torch device {torch_device()}\n"
    )
    rows = []  # (what, config, keras, torch, ratio, unit)

    if not args.skip_pipeline:
        images = synthetic_cifar()
        for name in args.pipelines.split(","):
            try:
                rate = bench_pipeline(
                    name, images, args.batch, args.pipeline_batches, max(args.repeats, 3)
                )
            except Exception as e:  # e.g. no TensorFlow on a GPU box
                print(f"pipeline {name}: skipped ({type(e).__name__}: {e})")
                continue
            rows.append((f"pipeline {name}", f"{args.batch} images -> {args.batch * NUM_ROTATIONS}",
                         f"{rate:.1f} batches/s = {rate * args.batch * NUM_ROTATIONS:.0f} samples/s",
                         "-", "-", "-"))

    ratios = []
    if not args.skip_training:
        samples = args.batch * NUM_ROTATIONS
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 255, size=(samples, 32, 32, 3)).astype("float32")
        y = np.tile(np.arange(NUM_ROTATIONS, dtype="int32"), args.batch)
        variants = []
        for text in dict.fromkeys(args.variants.split(",")):  # each once: rows are keyed by variant
            v = Variant(text)
            if v.spe > 1 and backend == "torch":  # Keras 3.15 raises ValueError
                print(f"variant {text}: skipped, steps_per_execution must be 1 on torch")
            elif v.data_format == "channels_first" and backend == "tensorflow" and not gpu():
                print(f"variant {text}: skipped, TensorFlow has no NCHW CPU convolutions")
            else:
                variants.append(v)
        for net_name in args.networks.split(","):
            arch, stem = NETWORKS[net_name]
            for precision in args.precisions.split(","):
                runners = []
                for v in variants:
                    model = build_keras(arch, stem, v, precision)
                    runners.append((f"keras {v.text}", KerasStep(model, v, x, y, args.steps)))
                if not args.skip_torch:
                    runners.append(("torch", TorchStep(arch, stem, precision, x, y, args.steps,
                                                       memory_format=args.torch_memory_format)))
                    if args.torch_compile:
                        runners.append(("torch compile", TorchStep(arch, stem, precision, x, y, args.steps,
                                                                   memory_format=args.torch_memory_format,
                                                                   compiled=True)))
                for label, run in runners:
                    t0 = time.perf_counter()
                    for _ in range(args.warmup):
                        run()
                    print(f"  {net_name} {precision} {label}: warm-up "
                          f"{time.perf_counter() - t0:.1f} s", flush=True)
                times = {label: [] for label, _ in runners}
                for r in range(args.repeats):
                    for label, run in runners:  # interleaved: shared load hits all alike
                        times[label].append(run())
                if args.profile:
                    for label, run in runners:
                        profile(f"{net_name} {precision} {label}", run, args.profile_rows)
                rate = {k: samples / statistics.median(v) for k, v in times.items()}
                for label, _ in runners:
                    if label.startswith("torch"):
                        continue
                    ratio = rate[label] / rate["torch"] if "torch" in rate else None
                    rows.append((net_name, f"{label}, {precision}", f"{rate[label]:.1f}",
                                 f"{rate['torch']:.1f}" if "torch" in rate else "-",
                                 f"{ratio:.2f}" if ratio else "-",
                                 spread(times[label])))
                    if ratio:
                        best = min(times["torch"]) / min(times[label])
                        ratios.append(f"ratio keras/pytorch: {ratio:.2f}  "
                                      f"({net_name}, {label}, {precision}, batch {samples}; "
                                      f"best-step ratio {best:.2f})")
                        if label == f"keras {args.headline}":
                            ratios.insert(0, f"{'gpu' if gpu() else 'cpu'} ratio keras-{backend}/pytorch-eager: "
                                             f"{ratio:.2f}  ({net_name}, {label}, {precision}, batch {samples}, "
                                             f"pytorch eager {args.torch_memory_format})")
                for label in (k for k in rate if k.startswith("torch")):
                    rows.append((net_name, f"{label} {args.torch_memory_format}, {precision}",
                                 "", f"{rate[label]:.1f}", "", spread(times[label])))
                del runners

    print("\n| what | configuration | keras (samples/s) | pytorch (samples/s) | "
          "keras/pytorch | step s (min-max) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    for line in ratios:
        print(line)
    print(f"\n(backend {backend}; training columns are rotated samples/s)")


def spread(times):
    return f"{min(times):.3f}-{max(times):.3f}"


if __name__ == "__main__":
    main()
