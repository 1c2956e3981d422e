"""The global gradient norm of every step of a recipe's rotation stage: a diagnostic, not a speed benchmark.

It trains the stage as `kerasrot run` would (same model, data, optimiser,
schedule), in a scratch work directory, and prints for each epoch the
median, 90th percentile and largest norm of all the gradients together,
before any clipping: the numbers behind the quick preset's
`global_clipnorm` (recipes/presets.toml, results/backends.md).

    python benchmarks/gradient_norms.py --epochs 2 --data-dir /tmp/kerasrot-data \\
        --set rotation.precision=float32 --set rotation.global_clipnorm=0

Reading the norms costs one wait per step: torch backend only.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import argparse  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kerasrot import training  # noqa: E402
from kerasrot.runner import config, speed, stages  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="table2")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--epochs", type=int, default=2, help="epochs to train before stopping")
    parser.add_argument("--data-dir")
    parser.add_argument("--set", action="append", default=[], metavar="TASK.KEY=VALUE")
    args = parser.parse_args()
    if keras.backend.backend() != "torch":
        parser.error("torch backend only")
    with tempfile.TemporaryDirectory(prefix="kerasrot-gradient-norms-") as scratch:  # its checkpoints go too
        print_norms(args, Path(scratch))


def print_norms(args, scratch):
    import torch

    recipe = config.load(args.recipe, args.preset, config.parse_overrides(args.set))
    options = stages.RunOptions(data_dir=args.data_dir, workdir=scratch)
    stages.resolve_stages(recipe, options)
    stage = next(s for s in recipe.stages if s.task == "rotation")
    model, train_batches, test_batches, _ = stages.stage_model_and_data(stage, options)

    norms = []

    class Report(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            # The torch trainer hands each step's gradients to `optimizer.apply`,
            # which clips them (when set) and updates: wrap this one optimiser's.
            plain_apply = self.model.optimizer.apply

            def apply_and_record(grads, variables=None):
                grads = list(grads)
                norms.append(float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))))
                return plain_apply(grads, variables)

            self.model.optimizer.apply = apply_and_record

        def on_epoch_end(self, epoch, logs=None):
            n = np.array(norms[-len(train_batches):])
            print(f"epoch {epoch + 1}: steps {len(n)}, norm median {np.median(n):.2f}, "
                  f"p90 {np.percentile(n, 90):.2f}, max {n.max():.2f} (step {len(norms) - len(n) + n.argmax() + 1})",
                  flush=True)
            if epoch + 1 >= args.epochs:
                self.model.stop_training = True

    settings = {**stage.settings, "verbose": 0}
    print(f"{args.recipe} --preset {args.preset} {' '.join(args.set)}: rotation stage, "
          f"global_clipnorm {settings['global_clipnorm']} (0: off), {settings['precision']}")
    training.compile_model(model, settings, steps_per_epoch=len(train_batches))
    speed.prepare_to_train(model, settings, log=print)  # as `kerasrot run` does
    training.train(model, train_batches, test_batches, settings, scratch / "checkpoints", callbacks=[Report()])


if __name__ == "__main__":
    main()
