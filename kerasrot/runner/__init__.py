"""The runner: how `kerasrot run` carries out a recipe. Not needed to follow the experiment.

The experiment itself is in the modules one level up (`kerasrot.data`,
`rotations`, `pipeline`, `models`, `training`, ...), which never import
this package. This package is the machinery around them:

* `config`: recipe files and presets to the stages' settings, `--set` checked;
* `stages`: runs the stages in order, caching finished ones by their settings;
* `speed`, `device` and `cuda_graphs`: the backend- and device-specific
  speed-ups, applied to a stage's model and batches before `training.train`;
* `distribute`: `--data-parallel`, Keras' DataParallel over every device (JAX);
* `progress`: the time-left estimate;
* `files`: atomic writes and the work directory's lock;
* `reporting`: metrics.json, table.md, history.csv and plots;
* `provenance`: the commit and package versions a result records;
* `evaluate`: re-measures a saved model;
* `predict`: a trained model's answers on your own images;
* `cli`: the `kerasrot` command.
"""
