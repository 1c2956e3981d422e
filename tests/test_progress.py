"""Every stage's work is counted before it runs, and a run writing to a file reports often enough to watch."""

import pytest

from kerasrot.runner import config, progress
from tests.test_cli import TINY, invoke


def test_show_states_each_stages_work_and_the_whole_recipes():
    recipe = config.load("table2", "quick")
    rotation = recipe.stages[0].settings
    result = invoke("show", "table2", "--preset", "quick")
    assert result.exit_code == 0, result.output
    samples = rotation["samples_per_epoch"] * 4  # every image and its three quarter turns
    assert (f"work, train: {rotation['epochs']} x {samples:,} = {rotation['epochs'] * samples:,} samples, "
            "whole network") in result.output
    assert "work, frozen part, once" in result.output  # the last-block stages compute it once
    total = sum(item.worth for items in progress.count_work(recipe.stages).values() for item in items)
    assert f"work in all: {total:,.0f} training samples of the whole network" in result.output


def test_the_probes_of_one_model_count_its_features_once():
    work = progress.count_work(config.load("probes", "quick").stages)
    features = {name: [w for w in items if w.what.startswith("features")] for name, items in work.items()}
    counted = [name for name, items in features.items() if items]
    assert counted == ["probes.stem.linear.rotation_init", "probes.stem.linear.random_init",
                       "probes.stem.linear.supervised"]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_progress_lines_come_at_least_every_interval(monkeypatch):
    """Output to a file: a line whenever `every` seconds have passed since the last, with the time left."""
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    stage = config.load("table1", "quick").stages[0]
    lines = []
    tracker = progress.RunTracker([stage], lines.append, plain=True, every=20)
    tracker.start_stage(stage, 1, 1)
    said = []
    for second in range(0, 300, 7):  # a batch every 7 s
        clock.now = second
        count = len(lines)
        tracker.advance(1000.0, lambda: "busy")
        if len(lines) > count:
            said.append(second)
    assert said and all(later - earlier <= 20 + 7 for earlier, later in zip([0, *said], said))
    assert all("left in the stage" in line and "in the run" in line for line in lines[1:])
    quiet = progress.RunTracker([stage], lines.append, plain=False, every=20)  # a terminal: Keras' bar
    quiet.start_stage(stage, 1, 1)
    count = len(lines)
    clock.now += 100
    quiet.advance(1000.0, lambda: "busy")
    assert len(lines) == count


@pytest.mark.parametrize("recipe", ["table2"])
def test_a_run_written_to_a_file_reports_samples_rate_and_time_left_in_plain_lines(recipe, data_root, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0)  # a line at every report
    result = invoke("run", recipe, "--data-dir", data_root, "--workdir", tmp_path / "work",
                    "--results", tmp_path / "results", *TINY)
    assert result.exit_code == 0, result.output
    training = [line for line in result.output.splitlines() if "samples/s" in line]
    estimated = [line for line in training if "left in the stage" in line and " in the run" in line]
    assert estimated and all(line in estimated or "estimated after the first batches" in line for line in training)
    assert any("frozen part" in line for line in result.output.splitlines())  # the last-block stages' first pass
    assert "\r" not in result.output  # no progress bar in a file
