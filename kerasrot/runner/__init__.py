"""The runner: how `kerasrot run` carries out a recipe. Not needed to follow the experiment.

The experiment itself is in the modules one level up (`kerasrot.data`,
`rotations`, `pipeline`, `models`, `training`). This package is the
machinery around it:

* `config`: recipe files and presets to the stages' settings, `--set` checked;
* `stages`: runs the stages in order, caching finished ones by their settings;
* `speed` and `device`: the backend- and device-specific speed-ups;
* `distribute`: `--data-parallel`, Keras' DataParallel over every device (JAX);
* `progress`: the time-left estimate;
* `files`: atomic writes and the work directory's lock;
* `reporting`: metrics.json, table.md, history.csv and plots;
* `evaluate`: re-measures a saved model;
* `cli`: the `kerasrot` command.
"""
