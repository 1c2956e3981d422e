"""What each kind of pass of a quick run costs per sample, and where a last-block stage's time goes.

Run by hand, alone on the machine:

    python benchmarks/last_block.py                       # this machine's defaults (bfloat16 where native)
    python benchmarks/last_block.py --precision float32
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/last_block.py --precision float32

It builds the stages of `kerasrot run table2` at the preset as the runner
does (speed choices of this backend and machine, random init), on
synthetic CIFAR-10-sized images, and prints one Markdown table: seconds
and milliseconds per sample of

1. the rotation stage's training step (whole network, forward and
   backward) and its test pass (forward): the unit `kerasrot show` counts
   work in;
2. the last-block stage trained as a whole model, frozen blocks included
   (how it trained before `kerasrot.frozen`): one epoch with its test pass;
3. its parts: the frozen part's outputs of every train and test image,
   once; one epoch of the trainable part on them, and its test pass;

and the cost of each beside (1), the figures behind
`kerasrot.runner.progress.COST`. `--profile` (torch) adds PyTorch's
profiler over a few steps of the trainable part: the operators that take
the time. Each figure is the median of `--repeats` timings after an
untimed warm-up.
"""

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("KERAS_BACKEND", "torch")

from kerasrot.runner import config, device, speed, stages  # noqa: E402 (kerasrot first: TensorFlow's oneDNN default)
import keras  # noqa: E402
import numpy as np  # noqa: E402

from kerasrot import frozen, training  # noqa: E402
from kerasrot.pipeline import Batches  # noqa: E402


def timed(function, repeats):
    function()  # warm-up: kernels chosen, optimiser built
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def fit_one_epoch(model, train, test=None):
    return lambda: model.fit(train, epochs=1, validation_data=test, shuffle=False, verbose=0)


def compiled(stage, model, batches):
    training.compile_model(model, stage.settings, steps_per_epoch=len(batches))
    speed.prepare_to_train(model, stage.settings, log=print)  # as `kerasrot run` does
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--precision", default="auto", help="auto, float32 or mixed_bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rotation-steps", type=int, default=8, help="steps of the rotation stage per timing")
    parser.add_argument("--profile", action="store_true", help="torch: print the operators that take the time")
    args = parser.parse_args(argv)

    overrides = config.parse_overrides([f"rotation.precision={args.precision}", f"classify.precision={args.precision}"])
    recipe = config.load("table2", args.preset, overrides)
    rotation, last_block = recipe.stages[0], recipe.stages[-1]  # the last: last_block.random_init
    for stage in (rotation, last_block):
        speed.resolve(stage.settings)
    s = last_block.settings
    num_train = (s["images_per_class"] or 5000) * 10
    num_test = (s["test_images_per_class"] or 1000) * 10
    batch = s["batch_size"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(num_train + num_test, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=num_train + num_test).astype("int32")
    train = Batches(images[:num_train], labels[:num_train], batch, augment=s["augment"], shuffle=True)
    test = Batches(images[num_train:], labels[num_train:], batch)
    print(f"{device.description()}, backend {keras.backend.backend()}, precision {s['precision']}, "
          f"data format {s['data_format']}; {num_train} train and {num_test} test images, batch {batch}; "
          f"median of {args.repeats}")

    rows = []  # (what, seconds, samples)
    rotation_batch = rotation.settings["batch_size"]
    rotated = Batches(images[:rotation_batch * args.rotation_steps], labels[:rotation_batch * args.rotation_steps],
                      rotation_batch, rotations=True, shuffle=True)
    rotnet = stages.initial_model(rotation, workdir=None, num_classes=4)
    compiled(rotation, rotnet, rotated)
    rows.append(("rotation stage: training step, whole network", timed(fit_one_epoch(rotnet, rotated), args.repeats),
                 rotated.num_samples))
    rotation_test = Batches(images[num_train:num_train + 1000], labels[num_train:num_train + 1000], rotation_batch,
                            rotations=True)
    rows.append(("rotation stage: test pass, whole network", timed(lambda: rotnet.evaluate(rotation_test, verbose=0),
                                                                   args.repeats), rotation_test.num_samples))

    model = stages.initial_model(last_block, workdir=None, num_classes=10)
    compiled(last_block, model, train)
    rows.append(("last block, whole model (the frozen blocks run every step): one epoch with its test pass",
                 timed(fit_one_epoch(model, train, test), args.repeats), num_train))
    frozen_part, trainable_part = frozen.split_at_frozen(model)
    plain = [Batches(split.images, split.labels, batch) for split in (train, test)]
    rows.append(("frozen part: outputs of every train and test image, once",
                 timed(lambda: [frozen.frozen_outputs(frozen_part, b) for b in plain], args.repeats),
                 num_train + num_test))
    (train_x, train_y), (test_x, test_y) = [frozen.frozen_outputs(frozen_part, b) for b in plain]
    train_outputs, test_outputs = Batches(train_x, train_y, batch, shuffle=True), Batches(test_x, test_y, batch)
    compiled(last_block, trainable_part, train_outputs)
    rows.append(("trainable part on them: one epoch with its test pass",
                 timed(fit_one_epoch(trainable_part, train_outputs, test_outputs), args.repeats), num_train))
    rows.append(("trainable part: one epoch without its test pass",
                 timed(fit_one_epoch(trainable_part, train_outputs), args.repeats), num_train))
    rows.append(("trainable part: its test pass", timed(lambda: trainable_part.evaluate(test_outputs, verbose=0),
                                                       args.repeats), num_test))

    unit = rows[0][1] / rows[0][2]
    print("\n| what | seconds | ms per sample | beside a rotation training sample |\n|---|---|---|---|")
    for what, seconds, samples in rows:
        print(f"| {what} | {seconds:.2f} | {1000 * seconds / samples:.3f} | {seconds / samples / unit:.3f} |")

    if args.profile and keras.backend.backend() == "torch":
        import torch

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            trainable_part.fit(train_outputs, epochs=1, steps_per_epoch=8, verbose=0)
        print("\nPyTorch's profiler, 8 steps of the trainable part:\n")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
