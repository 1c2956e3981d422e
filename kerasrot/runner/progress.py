"""Progress: how much work each stage is, how fast the run goes, and the time it has left.

A stage's work is counted before it starts (`count_work`): how many samples
each of its passes processes, and what one of those samples costs beside a
training sample of the whole network, forward and backward (`COST`).
`kerasrot show` prints the counts and their total, so the time of a recipe
on any machine is that total over the machine's training rate
(`benchmarks/throughput.py` measures it), plus reading the data.

While a run trains, `RunTracker` turns the work done and the seconds it took
into the time left, in the stage and in the whole run. `Progress`, a Keras
callback, reports every batch to it. In a terminal Keras draws its progress
bar and the tracker adds a line after every epoch; in a log file (output
that is not a terminal) the tracker writes a plain line at least every
`EVERY_SECONDS`, so a slow CPU never looks hung.
"""

import dataclasses
import time

import keras

from kerasrot import data, frozen
from kerasrot.rotations import NUM_ROTATIONS

EVERY_SECONDS = 20  # a plain progress line at least this often (a batch may add a few seconds)

# What one sample of each kind of pass costs, beside a training sample of the
# whole network: `python benchmarks/last_block.py --repeats 1` for ResNet18
# (ImageNet stem, 32x32, float32) on 2 cores of an AVX2-only AMD EPYC, where
# that training sample took 2.2 ms (results/backends.md, "A quick preset for
# a small CPU"). Other networks and machines differ a little: the estimate
# adapts its speed as the run goes, not these ratios.
COST = {
    "whole network": 1.0,  # forward and backward through every layer
    "whole network, forward": 0.29,  # a test pass
    "frozen part, forward": 0.33,  # the frozen part of a network, once (kerasrot.frozen), copied out to NumPy
    "trainable part": 0.15,  # forward and backward through the trainable part only
    "trainable part, forward": 0.07,
    "probe": 0.01,  # a small classifier on cached features (kerasrot.probes): not measured, an upper guess
}


@dataclasses.dataclass
class Work:
    """One kind of pass of a stage: `passes` x `samples`, each costing `COST[kind]`."""

    what: str  # "train", "test", ...
    kind: str
    passes: int
    samples: int | None  # None: not known before the data is read (an own folder)

    @property
    def worth(self):
        """In training samples of the whole network."""
        return self.passes * (self.samples or 0) * COST[self.kind]

    def describe(self):
        if self.samples is None:
            return f"{self.what}: {self.passes} x the images of the folder, {self.kind} (cost {COST[self.kind]:g} each)"
        return (f"{self.what}: {self.passes} x {self.samples:,} = {self.passes * self.samples:,} samples, {self.kind} "
                f"(cost {COST[self.kind]:g} each)")


def split_sizes(settings, split):
    """Images the stage takes from `split` ("train" or "test"), or None where only reading the data tells."""
    per_class = settings["images_per_class" if split == "train" else "test_images_per_class"]
    info = data.DATASETS.get(settings["dataset"])
    if info is None:
        return None
    return per_class * len(info.class_names) if per_class is not None else info.sizes[split]


def stage_work(stage, features_counted=False, sizes=None):
    """The passes of one stage (`Work` list). `features_counted`: a probe whose features another probe computed.

    `sizes`: the `(train, test)` images the stage read, once it has; before,
    they are computed from its settings and the dataset's published sizes.
    """
    s = stage.settings
    train, test = sizes or (split_sizes(s, "train"), split_sizes(s, "test"))
    both = None if None in (train, test) else train + test
    copies = NUM_ROTATIONS if stage.task == "rotation" else 1
    epoch = s.get("samples_per_epoch") or train
    epoch, test = (None if n is None else n * copies for n in (epoch, test))
    if stage.task == "probe":
        features = [] if features_counted else [Work("features of every block, once", "whole network, forward", 1,
                                                     both)]
        return [*features, Work("train", "probe", s["epochs"], train), Work("test", "probe", s["epochs"], test),
                Work("test of the saved model", "probe", 1, test)]
    if stage.task == "classify" and frozen.computed_once(s["trainable"], s["augment"]):
        return [Work("frozen part, once", "frozen part, forward", 1, both),
                Work("train", "trainable part", s["epochs"], epoch),
                Work("test", "trainable part, forward", s["epochs"], test),
                Work("test of the saved model", "whole network, forward", 1, test)]
    knn = [knn_work(s, test // copies)] if s.get("knn_monitor", "off") != "off" and knn_has_labels(s) else []
    return [Work("train", "whole network", s["epochs"], epoch), Work("test", "whole network, forward", s["epochs"], test),
            *knn, Work("test of the saved model", "whole network, forward", 1, test)]


KNN_SHARE = 0.05  # knn_monitor = "auto" is on where it adds at most this to its stage's work


def knn_has_labels(settings):
    """Whether the kNN monitor can score a rotation stage's data: the built-in datasets have labels."""
    return settings["dataset"] in data.DATASETS


def knn_work(settings, test_images):
    """The kNN monitor's passes (`kerasrot.knn`): each epoch, its labelled subset and the test images, forward."""
    subset = settings["knn_images_per_class"] * len(data.DATASETS[settings["dataset"]].class_names)
    return Work("kNN monitor", "whole network, forward", settings["epochs"], subset + test_images)


def knn_share(stage):
    """What the kNN monitor adds to a rotation stage's work, as a share of the rest."""
    items = stage_work(stage)
    monitor = sum(item.worth for item in items if item.what == "kNN monitor")
    return monitor / max(sum(item.worth for item in items) - monitor, 1e-9)


def count_work(stages):
    """`{stage name: [Work]}`; the probes of one model share its features, counted once."""
    work, seen = {}, set()
    for stage in stages:
        source = (stage.settings.get("init"), stage.settings["dataset"])
        work[stage.name] = stage_work(stage, features_counted=stage.task == "probe" and source in seen)
        if stage.task == "probe":
            seen.add(source)
    return work


def minutes(seconds):
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


class RunTracker:
    """The run's work done and left, its speed so far, and plain progress lines.

    `plain=True` (output to a file): a line at least every `every` seconds.
    """

    def __init__(self, stages, log, plain, every=None):
        self.work = count_work(stages)
        self.left = {name: sum(w.worth for w in works) for name, works in self.work.items()}
        self.log, self.plain, self.every = log, plain, EVERY_SECONDS if every is None else every
        self.done = 0.0  # worth done in this run
        self.seconds = 0.0  # the seconds it took: between reports, so reading data and saving models do not count
        self.stage = None

    def start_stage(self, stage, index, total):
        self.stage, self.last_report = stage, None
        self.last_line = time.perf_counter()
        self.log(f"[stage {index}/{total}] {stage.name}: {describe_stage(stage)}; {self.eta()}")

    def cost(self, what):
        """What one sample of the current stage's pass `what` ("train", "test", ...) costs; 0 if it has none."""
        return next((COST[item.kind] for item in self.work[self.stage.name] if item.what == what), 0.0)

    def skip(self, stage):
        self.left[stage.name] = 0.0

    def read(self, stage, train_images, test_images):
        """The stage has read its data: its work, counted again from the images it holds."""
        elsewhere = stage.task == "probe" and not any(item.what.startswith("features") for item in self.work[stage.name])
        self.work[stage.name] = stage_work(stage, features_counted=elsewhere, sizes=(train_images, test_images))
        self.left[stage.name] = sum(item.worth for item in self.work[stage.name])

    def counter(self, what, label, total):
        """An `on_batch(images)` for a pass of the stage outside `model.fit` (frozen outputs, block features)."""
        done = 0

        def on_batch(images):
            nonlocal done
            done += images
            self.advance(images * self.cost(what), lambda: f"{label}, {done:,}/{total:,} images")

        return on_batch

    def finish_stage(self):
        self.left[self.stage.name] = 0.0

    def advance(self, worth, status):
        """`worth` more done in the current stage; `status()` says what, for a plain line when one is due."""
        now = time.perf_counter()
        if self.last_report is not None:
            self.seconds += now - self.last_report
            self.done += worth
            self.left[self.stage.name] = max(self.left[self.stage.name] - worth, 0.0)
        self.last_report = now  # (the first report of a stage starts its clock)
        if self.plain and now - self.last_line >= self.every:
            self.line(status())

    def line(self, status):
        self.log(f"  {self.stage.name}: {status}; {self.eta()}")
        self.last_line = time.perf_counter()

    def eta(self):
        if not self.done:
            return "time left: estimated after the first batches"
        per_worth = self.seconds / self.done
        stage, run = self.left[self.stage.name] * per_worth, sum(self.left.values()) * per_worth
        return f"about {minutes(stage)} left in the stage, {minutes(run)} in the run"


def describe_stage(stage):
    s = stage.settings
    what = f"{stage.task} {s['model']} ({s['stem']} stem) on {s['dataset']}"
    if stage.task == "classify":
        what += f", init {s['init']}, trainable {s['trainable']}"
    if stage.task == "probe":
        what += f", {s['probe']} probe of {s['block']}, init {s['init']}"
    return what


class Progress(keras.callbacks.Callback):
    """Reports each batch of `model.fit`, and of its test passes, to the run's `RunTracker`."""

    def __init__(self, tracker, train, test):
        super().__init__()
        self.tracker = tracker
        self.train_samples, self.train_steps = train.num_samples, len(train)
        self.test_samples, self.test_steps = test.num_samples, len(test)
        self.cost, self.test_cost = tracker.cost("train"), tracker.cost("test")
        # A kNN monitor's passes (kerasrot.knn) end each epoch, before this callback's on_epoch_end.
        self.knn = sum(item.worth / item.passes for item in tracker.work[tracker.stage.name] if item.what == "kNN monitor")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.seen, self.epoch_start = epoch + 1, 0, time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        done = min((batch + 1) * self.train_samples / self.train_steps, self.train_samples)
        step, self.seen = done - self.seen, done
        self.tracker.advance(step * self.cost, self.status)

    def on_test_batch_end(self, batch, logs=None):
        self.tracker.advance(self.test_samples / self.test_steps * self.test_cost,
                             lambda: f"epoch {self.epoch}/{self.params['epochs']}, testing")

    def status(self):
        rate = self.seen / max(time.perf_counter() - self.epoch_start, 1e-9)
        return (f"epoch {self.epoch}/{self.params['epochs']}, {self.seen:,.0f}/{self.train_samples:,} samples, "
                f"{rate:,.0f} samples/s")

    def on_epoch_end(self, epoch, logs=None):
        if self.knn:
            self.tracker.advance(self.knn, lambda: "kNN monitor")
        self.tracker.line(f"epoch {self.epoch}/{self.params['epochs']} done")
