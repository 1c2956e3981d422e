"""The `kerasrot` command: list, show, run, evaluate and report recipes.

Errors a user can fix (a wrong name, a bad value, missing data) end in one
line on stderr and exit status 1 or 2; `--debug` shows the traceback too.
Keras is imported inside the commands, after `KERAS_BACKEND` is checked,
so even a wrong backend name gets a clear answer.
"""

import functools
import importlib.util
import os
import re
import shlex
import sys
import time
import traceback
from pathlib import Path

import click

BACKENDS = ("torch", "jax", "tensorflow")
DEFAULT_WORKDIR = Path("~/.cache/kerasrot").expanduser()


class Failure(click.ClickException):
    """One line to stderr (the message as it is, no "Error:" prefix), exit status 1."""

    def show(self, file=None):
        click.echo(self.message, err=True)


def _check_backend():
    name = os.environ.get("KERAS_BACKEND", "torch")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's runtime logs (start-up: below)
    if name not in BACKENDS:
        raise Failure(f"error: KERAS_BACKEND={name!r} is not supported; use one of {', '.join(BACKENDS)}")
    if importlib.util.find_spec(name) is None:  # else `import keras` ends in a ModuleNotFoundError traceback
        raise Failure(f"error: KERAS_BACKEND={name}, but {name} is not installed here: pip install {name} "
                      "(see README.md, Install), or choose another backend")


def _import_tensorflow_quietly():
    """Imports TensorFlow (tf.data, tfds, its backend) without its C++ start-up chatter.

    Called at start-up (`main`), before anything imports TensorFlow: Keras
    does where it is installed, tf.data and tfds read data with it.

    TensorFlow 2.21 logs "oneDNN custom operations are on" and more to
    stderr through absl, which `TF_CPP_MIN_LOG_LEVEL` no longer silences.
    So the import runs with the stderr file descriptor sent to a temporary
    file, which is shown only if the import fails.
    """
    import tempfile

    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as chatter:
        os.dup2(chatter.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except Exception:
            os.dup2(saved, 2)
            chatter.seek(0)
            sys.stderr.write(chatter.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _friendly_errors(function):
    """Turns the errors users cause into one clear line (tracebacks with --debug)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = ctx.find_root().params.get("debug", False)
        try:
            return function(*args, **kwargs)
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            raise Failure("interrupted; run the same command again to resume") from None
        except Exception as error:  # noqa: BLE001 - every failure gets one line
            if debug:
                traceback.print_exc()
            raise Failure(_describe(error)) from None

    return wrapper


def _describe(error):
    from kerasrot.data import DataError
    from kerasrot.runner.config import RecipeError
    from kerasrot.runner.distribute import DistributeError
    from kerasrot.runner.files import WorkdirBusy
    from kerasrot.runner.stages import StageError

    if isinstance(error, (DataError, RecipeError, WorkdirBusy, StageError, DistributeError)):
        return f"error: {error}"
    if type(error).__name__ == "IndivisibleError":  # JAX: a batch that --data-parallel cannot split
        sizes = re.search(r"partitioned (\d+) times, but the dimension size is (\d+)", str(error))
        batch = f"a batch of {sizes[2]} samples over {sizes[1]} devices" if sizes else "a batch over the devices"
        return (f"error: --data-parallel cannot split {batch} (the last, shorter batch of an epoch or of the test "
                f"set?); choose batch_size, samples_per_epoch, images_per_class or test_images_per_class so that "
                f"every batch splits evenly")
    if isinstance(error, PermissionError):
        return f"error: cannot write {error.filename}: permission denied; choose a writable --workdir/--results"
    if isinstance(error, OSError) and error.errno == 28:
        return "error: the disk is full; free space and run the same command again to resume"
    if isinstance(error, OSError) and error.filename:
        return f"error: {error.strerror or error} ({error.filename})"
    return f"error: {type(error).__name__}: {error} (run with --debug for the traceback)"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def main(debug):
    """Rotation pretraining (RotNet) on CIFAR-10 with Keras 3: reproduce the tables."""
    _check_backend()
    # Keras imports TensorFlow where it is installed (keras.src.tree), whichever the
    # backend: every command would show its start-up chatter without this.
    _import_tensorflow_quietly()


@main.command("list")
@_friendly_errors
def list_recipes():
    """The recipes and what each reproduces."""
    from kerasrot.runner import config

    for name in config.available():
        recipe = config.load(name, "quick")
        click.echo(f"{name:11s} {recipe.title}")
        names = [s.name for s in recipe.stages]
        shown = names if len(names) <= 6 else [*names[:5], f"... ({len(names)} stages)"]
        click.echo(f"{'':11s} stages: {', '.join(shown)}")


@main.command()
@click.argument("recipe")
@click.option("--preset", default="quick", show_default=True, help="quick (CPU, minutes) or paper (GPU).")
@click.option("--set", "overrides", multiple=True, metavar="TASK.KEY=VALUE", help="Override a setting.")
@_friendly_errors
def show(recipe, preset, overrides):
    """The stages and every setting of RECIPE, after preset and overrides."""
    from kerasrot.runner import config

    from kerasrot.runner.progress import count_work

    loaded = config.load(recipe, preset, config.parse_overrides(overrides))
    click.echo(f"{loaded.name} --preset {preset}: {loaded.title}\n{loaded.reproduces}\n")
    work = count_work(loaded.stages)
    for stage in loaded.stages:
        click.echo(f"stage {stage.name} ({stage.task})")
        for key, value in stage.settings.items():
            shown = "all" if value is None else value
            click.echo(f"  {stage.task}.{key:22s} = {shown!r:12}  # {config.SETTINGS[key].help}")
        for item in work[stage.name]:
            click.echo(f"  work, {item.describe()}")
    known = all(item.samples is not None for items in work.values() for item in items)
    total = sum(item.worth for items in work.values() for item in items)
    click.echo(f"\nwork in all: {total:,.0f} training samples of the whole network, or their cost"
               + ("" if known else " (and the images of own folders, counted when read)")
               + "; time = that / the training rate of `python benchmarks/throughput.py`, plus reading the data")


@main.command()
@click.argument("recipe")
@click.option("--preset", default="quick", show_default=True, help="quick (CPU, minutes) or paper (GPU).")
@click.option(
    "--data-dir", type=click.Path(file_okay=False), default=None,
    help="Folder with cifar10/ and imagenette/ image folders [default: $KERASROT_DATA_DIR, else download with tfds].",
)
@click.option(
    "--workdir", type=click.Path(file_okay=False), default=None,
    help=f"Checkpoints and stage cache [default: $KERASROT_WORKDIR or {DEFAULT_WORKDIR}].",
)
@click.option("--results", type=click.Path(file_okay=False), default="results", show_default=True,
              help="Where results/<recipe>/<preset>/ go.")
@click.option("--set", "overrides", multiple=True, metavar="TASK.KEY=VALUE",
              help="Override a setting, e.g. --set rotation.epochs=3 (see `kerasrot show`).")
@click.option("--data-parallel", is_flag=True,
              help="Split every batch over all accelerators (JAX backend; README, 'More than one accelerator').")
@click.option("--tensorboard", type=click.Path(file_okay=False), default=None,
              help="Write TensorBoard logs of every stage to DIR/<stage>/ (keras.callbacks.TensorBoard) while it trains.")
@_friendly_errors
def run(recipe, preset, data_dir, workdir, results, overrides, data_parallel, tensorboard):
    """Train and evaluate every stage of RECIPE, then write its results."""
    import keras

    from kerasrot.runner import config, device, distribute, provenance, reporting, stages

    started = time.perf_counter()
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise Failure("error: --tensorboard needs the tensorboard package: pip install tensorboard")
    # First: on several machines JAX must connect them before it does anything
    # else, and every model must be built after the distribution is set.
    devices = distribute.data_parallel(data_parallel)
    commit = provenance.git_commit()  # the code that runs, even if the tree changes meanwhile
    loaded = config.load(recipe, preset, config.parse_overrides(overrides))
    distribute.check_batch_sizes(loaded.stages)
    data_dir = _data_dir(data_dir)
    workdir = Path(workdir or os.environ.get("KERASROT_WORKDIR") or DEFAULT_WORKDIR).expanduser()
    backend = keras.backend.backend()
    out = reporting.results_dir(results, loaded.name, preset, backend)
    _check_writable(out)  # made when the results are written: a run that stops before leaves no empty folder
    _check_writable(workdir)

    machine = device.description()  # after the distribution is set: it names the devices sharing a batch
    click.echo(f"kerasrot run {loaded.name} --preset {preset}: backend {backend}, "
               f"{machine}, workdir {workdir}, results {out}")
    options = stages.RunOptions(data_dir=data_dir, workdir=workdir, log=click.echo, machine=machine, devices=devices,
                                commit=commit, tensorboard=Path(tensorboard) if tensorboard else None)
    stage_results = stages.run_recipe(loaded, options)

    settings = [s.settings for s in loaded.stages]
    sources = sorted({r["data_source"] for r in stage_results.values()})
    prov = provenance.record(
        _command_line(), backend, machine, "; ".join(sources),
        time.perf_counter() - started, settings, commit, devices=devices,
    )
    metrics = reporting.build_metrics(loaded, stage_results, prov)
    click.echo(f"\n{reporting.markdown_table(metrics)}")
    if distribute.process_shard()[0] != 0:  # several machines: the first one writes the results
        click.echo("results are written by process 0")
        return
    reporting.write_report(metrics, out)
    for name, figure in stages.look_inside(loaded, options).items():
        reporting.save_figure(figure, out / name)
    click.echo(f"results written to {out}/ ({', '.join(sorted(f.name for f in out.iterdir()))})")


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Folder with cifar10/ and imagenette/ image folders [default: $KERASROT_DATA_DIR, "
                   "else download with tfds].")
@click.option("--dataset", default=None,
              help="Test set: cifar10, imagenette, folder:PATH or tfds:NAME [default: the one it was trained on].")
@click.option("--test-images-per-class", default=None,
              help="Test images per class, or 'all' [default: as recorded beside the checkpoint, else all].")
@_friendly_errors
def evaluate(checkpoint, data_dir, dataset, test_images_per_class):
    """Accuracy of a saved .keras model on the test set of its task."""
    from kerasrot.runner.evaluate import evaluate_checkpoint

    click.echo(evaluate_checkpoint(checkpoint, _data_dir(data_dir), dataset, test_images_per_class))


@main.command()
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@click.option("--upright", type=click.Path(file_okay=False), default=None,
              help="Rotation models: write every image turned back upright into this folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the predictions as JSON instead of a table.")
@click.option("--gallery", type=click.Path(dir_okay=False), default=None,
              help="Draw the images with their predictions into this PNG file.")
@click.option("--preset", default="quick", show_default=True, help="For MODEL as RECIPE:STAGE: the run's preset.")
@click.option("--set", "overrides", multiple=True, metavar="TASK.KEY=VALUE", help="For RECIPE:STAGE: the run's --set.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help=f"For RECIPE:STAGE: the stage cache [default: $KERASROT_WORKDIR or {DEFAULT_WORKDIR}].")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="For RECIPE:STAGE: the run's --data-dir [default: $KERASROT_DATA_DIR, else tfds].")
@_friendly_errors
def predict(model, images, upright, as_json, gallery, preset, overrides, workdir, data_dir):
    """Apply MODEL to IMAGES (files or folders): which way up each is, or its classes.

    MODEL is a .keras file or a recipe's stage, e.g. table2:rotation, as
    `kerasrot run` trained it with the same --preset and --set.
    """
    from kerasrot.runner import config, predict as predicting, reporting

    if model.endswith(".keras") or Path(model).exists() or ":" not in model:
        path = Path(model)
    else:
        workdir = Path(workdir or os.environ.get("KERASROT_WORKDIR") or DEFAULT_WORKDIR).expanduser()
        path = predicting.stage_model_path(model, preset, config.parse_overrides(overrides), workdir,
                                           _data_dir(data_dir))
    paths = predicting.image_paths(images)
    if not paths:
        raise Failure("error: no images found in " + " ".join(images))
    loaded, task, predictions = predicting.predict(path, paths)
    if upright and task != "rotation":
        raise Failure(f"error: --upright needs a rotation model; {model} is a classifier")
    click.echo(predicting.as_json(predictions) if as_json else predicting.table(predictions))
    if upright:
        written = predicting.write_upright(paths, predictions, upright)
        click.echo(f"{len(written)} image(s) written upright to {upright}/", err=as_json)
    if gallery:
        reporting.save_figure(predicting.gallery(paths, predictions, loaded.input_shape[1]), gallery)
        click.echo(f"gallery written to {gallery}", err=as_json)


@main.command()
@click.argument("recipe")
@click.option("--preset", default="quick", show_default=True)
@click.option("--results", type=click.Path(file_okay=False), default="results", show_default=True)
@click.option("--backend", "backend_name", type=click.Choice(BACKENDS), default=None,
              help="Which backend's results [default: the current KERAS_BACKEND].")
@_friendly_errors
def report(recipe, preset, results, backend_name):
    """Redraw table.md, history.csv and plots from results/RECIPE/PRESET/metrics.json.

    The published numbers and notes come from the recipe as it reads now.
    """
    from kerasrot.runner import config, reporting

    loaded = config.load(recipe, preset)
    directory = reporting.results_dir(results, recipe, preset, backend_name or os.environ["KERAS_BACKEND"])
    if not (directory / "metrics.json").exists():
        raise Failure(f"error: no {directory}/metrics.json; run `kerasrot run {recipe} --preset {preset}` first")
    metrics = reporting.render(directory, loaded)
    click.echo(reporting.markdown_table(metrics))


def _data_dir(option):
    """--data-dir, else $KERASROT_DATA_DIR, else None (tfds downloads)."""
    data_dir = option or os.environ.get("KERASROT_DATA_DIR") or None
    if data_dir and not Path(data_dir).is_dir():
        raise Failure(f"error: --data-dir {data_dir} does not exist (see README, 'Data')")
    return data_dir


def _check_writable(directory):
    """Stops with one line unless `directory` can be made and written, leaving nothing new behind."""
    import tempfile

    directory = Path(directory).expanduser().absolute()
    existing = next(folder for folder in (directory, *directory.parents) if folder.exists())
    try:  # the nearest folder that exists takes a file (and then the folders below it)
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a folder", str(existing))
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise Failure(f"error: cannot write to {directory} ({error.strerror}); choose another folder") from None


def _command_line():
    backend = os.environ.get("KERAS_BACKEND", "torch")
    prefix = "" if backend == "torch" else f"KERAS_BACKEND={backend} "
    # What else the run's devices depend on: XLA_FLAGS (e.g. a CPU's host devices), several machines.
    from kerasrot.runner.distribute import MULTI_HOST_VARIABLES

    for name in ("XLA_FLAGS", *MULTI_HOST_VARIABLES):
        if os.environ.get(name):
            prefix += f"{name}={shlex.quote(os.environ[name])} "
    return prefix + "kerasrot " + " ".join(shlex.quote(a) for a in sys.argv[1:])


if __name__ == "__main__":
    main()
