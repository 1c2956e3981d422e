"""Progress: after each epoch, how far the whole run is and an estimate of the time left."""

import time

import keras


def planned_samples(stage):
    """Training samples a stage will process: its share of the time-left estimate."""
    s = stage.settings
    images = (s["images_per_class"] or 5000) * 10
    if stage.task == "probe":  # one pass for features (shared by the probes of one model), then tiny heads
        return images * (1 + 0.01 * s["epochs"]) / 10
    per_epoch = s["samples_per_epoch"] or images
    if stage.task == "rotation":
        per_epoch *= 4
    frozen_backbone = stage.task == "classify" and s["trainable"] != "all"
    return per_epoch * s["epochs"] * (0.5 if frozen_backbone else 1.0)


class RunTracker:
    """Estimates the time left from the training speed seen so far in this run."""

    def __init__(self, stages, log):
        self.todo = {stage.name: planned_samples(stage) for stage in stages}
        self.log = log
        self.done_samples = 0.0
        self.seconds = 0.0
        self.current = None
        self._epoch_start = None

    def start_stage(self, stage, index, total):
        self.current = stage
        self._epoch_start = time.perf_counter()
        s = stage.settings
        what = f"{s['model']} ({s['stem']} stem) on {s['dataset']}"
        if stage.task == "classify":
            what += f", init {s['init']}, trainable {s['trainable']}"
        self.log(f"[stage {index}/{total}] {stage.name}: {stage.task} {what}; {self.eta()}")

    def epoch_done(self):
        now = time.perf_counter()
        per_epoch = planned_samples(self.current) / self.current.settings["epochs"]
        self.done_samples += per_epoch
        self.seconds += now - self._epoch_start
        self.todo[self.current.name] -= per_epoch
        self._epoch_start = now
        self.log(f"  {self.current.name}: {self.eta()}")

    def skip(self, stage):
        self.todo[stage.name] = 0

    def eta(self):
        left = sum(max(v, 0) for v in self.todo.values())
        if not self.done_samples:
            return "time left: estimated after the first epoch"
        minutes = left * self.seconds / self.done_samples / 60
        return f"about {minutes:.0f} min left in this run" if minutes >= 1 else "under a minute left"


class Progress(keras.callbacks.Callback):
    """Reports each finished epoch to the run's `RunTracker`."""

    def __init__(self, tracker):
        super().__init__()
        self.tracker = tracker

    def on_epoch_end(self, epoch, logs=None):
        self.tracker.epoch_done()
