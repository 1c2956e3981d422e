import pytest

from kerasrot.runner import config


@pytest.mark.parametrize("preset", config.PRESETS)
@pytest.mark.parametrize("name", config.available())
def test_every_recipe_loads_under_every_preset(name, preset):
    recipe = config.load(name, preset)
    assert recipe.stages and recipe.title
    assert all(stage.key for stage in recipe.stages)


def test_every_recipe_is_shipped_in_the_package():
    assert config.available() == ["figure1", "imagenette", "probes", "table1", "table2", "table3", "table4"]


def test_overrides_change_settings_of_their_task_only():
    recipe = config.load("table2", "quick", config.parse_overrides(["rotation.epochs=3", "classify.nesterov=false"]))
    rotation, *classify = recipe.stages
    assert rotation.settings["epochs"] == 3 and rotation.settings["nesterov"] is True
    assert all(s.settings["nesterov"] is False and s.settings["epochs"] != 3 for s in classify)


@pytest.mark.parametrize(
    "pair,message",
    [
        ("rotation.epochs=-1", "at least 1"),
        ("classify.batch_size=0", "at least 1"),
        ("rotation.learning_rate=fast", "expected float"),
        ("rotation.learning_rate=nan", "must be a finite number"),
        ("classify.learning_rate=inf", "must be a finite number"),
        ("rotation.weight_decay=-inf", "must be a finite number"),
        ("rotation.step_epochs=10,abc", "expected comma-separated integers"),
        ("rotation.step_epochs=10,-5", "step_epochs must be at least 1"),
        ("rotation.momentum=1.5", "must be below 1"),
        ("rotation.trainable=all", "trainable is a setting of classify stages only"),
        ("rotation.init=random", "init is a setting of classify and probe stages only"),
        ("probe.augment=true", "augment is a setting of rotation and classify stages only"),
        ("figure1.labels_per_class=20,abc", "expected positive integers"),
        ("figure1.labels_per_class=20,-5", "expected positive integers"),
        ("figure1.labels_per_class=", "expected positive integers"),
        ("classify.pipeline=fast", "must be one of memory, tfdata"),
        ("rotation.nesterov=maybe", "expected bool"),
        ("rotation.optimiser=sgd", "unknown setting 'optimiser'"),
        ("epochs=3", "the key must be TASK.KEY with TASK one of rotation, classify, probe"),
        ("rotation.optimizer=rmsprop", "must be one of"),
        ("rotation.epochs", "expected TASK.KEY=VALUE"),
    ],
)
def test_bad_overrides_are_refused_with_a_reason(pair, message):
    with pytest.raises(config.RecipeError, match=message):
        config.parse_overrides([pair])


def test_unknown_recipe_and_preset_are_refused():
    with pytest.raises(config.RecipeError, match="unknown recipe 'table9'"):
        config.load("table9")
    with pytest.raises(config.RecipeError, match="unknown preset 'fast'"):
        config.load("table2", "fast")


def test_rotation_stage_is_shared_between_recipes_and_keys_follow_their_inputs():
    keys = {name: {s.name: s.key for s in config.load(name, "quick").stages} for name in ("table1", "table2", "table3", "figure1")}
    assert len({k["rotation"] for k in keys.values()}) == 1
    changed = {s.name: s.key for s in config.load("table2", "quick", config.parse_overrides(["rotation.epochs=2"])).stages}
    assert changed["rotation"] != keys["table2"]["rotation"]
    # the classify stage that starts from the rotation weights changes with them; the random one does not
    assert changed["last_block.rotation_init"] != keys["table2"]["last_block.rotation_init"]
    assert changed["last_block.random_init"] == keys["table2"]["last_block.random_init"]


def test_figure1_has_one_stage_per_size_and_init():
    recipe = config.load("figure1", "paper")
    names = [s.name for s in recipe.stages]
    for n in (20, 100, 400, 1000, 5000):
        assert f"figure1.{n}.rotation_init" in names and f"figure1.{n}.random_init" in names
    sizes = config.load("figure1", "quick", config.parse_overrides(["figure1.labels_per_class=20"])).stages
    assert [s.name for s in sizes] == ["rotation", "figure1.20.rotation_init", "figure1.20.random_init"]
    assert sizes[1].settings["images_per_class"] == 20


def test_table2_and_table3_share_their_rotation_stage_under_every_preset():
    for preset in config.PRESETS:
        table2 = {s.name: s for s in config.load("table2", preset).stages}
        table3 = {s.name: s for s in config.load("table3", preset).stages}
        assert table2["rotation"].key == table3["rotation"].key
        assert table3["full.rotation_init"].init_stage is not None
        assert table3["full.rotation_init"].init_stage.key == table2["rotation"].key
        # different trainable blocks: different classify stages
        assert table2["last_block.rotation_init"].key != table3["full.rotation_init"].key


@pytest.mark.parametrize("override", ["rotation.learning_rate=0.05", "rotation.seed=1", "rotation.augment=true"])
def test_any_rotation_setting_changes_the_keys_of_stages_that_start_from_it(override):
    plain = {s.name: s.key for s in config.load("table3", "quick").stages}
    changed = {s.name: s.key for s in config.load("table3", "quick", config.parse_overrides([override])).stages}
    assert changed["rotation"] != plain["rotation"]
    assert changed["full.rotation_init"] != plain["full.rotation_init"]
    assert changed["full.random_init"] == plain["full.random_init"]


def test_settings_that_do_not_change_results_keep_the_keys():
    plain = [s.key for s in config.load("table2", "quick").stages]
    overrides = config.parse_overrides(["rotation.verbose=0", "classify.pipeline=tfdata", "rotation.pipeline=tfdata"])
    assert [s.key for s in config.load("table2", "quick", overrides).stages] == plain


def test_keys_include_the_runner_context():
    stages = config.load("table1", "quick").stages
    config.key_stages(stages, context={"data": "/a"})
    first = stages[0].key
    config.key_stages(stages, context={"data": "/b"})
    assert stages[0].key != first


@pytest.mark.parametrize(
    "pair,value",
    [
        ("rotation.epochs=3", 3), ("rotation.learning_rate=0.5", 0.5), ("rotation.nesterov=no", False),
        ("rotation.images_per_class=all", None), ("rotation.step_epochs=10,20", [10, 20]),
        ("rotation.step_epochs=", []), ("figure1.labels_per_class=20,400", [20, 400]),
        ("classify.trainable=head", "head"),
    ],
)
def test_overrides_parse_to_typed_values(pair, value):
    task, key = pair.split("=")[0].split(".")
    assert config.parse_overrides([pair]) == {task: {key: value}}


@pytest.mark.parametrize(
    "pair", ["rotation.learning_rate=-0.1", "rotation.image_size=0", "rotation.samples_per_epoch=0",
             "rotation.stem=vgg", "rotation.verbose=3", "classify.trainable=layer3"],
)
def test_out_of_range_values_are_refused(pair):
    with pytest.raises(config.RecipeError):
        config.parse_overrides([pair])


@pytest.fixture
def recipe_copy(tmp_path, monkeypatch):
    """The recipe files copied to `tmp_path`, which `config` then reads instead."""
    for name in ("presets", "table1"):
        (tmp_path / f"{name}.toml").write_text(config._recipe_files().joinpath(f"{name}.toml").read_text())
    monkeypatch.setattr(config, "_recipe_files", lambda: tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "file,addition,message",
    [
        ("table1", '[presets.quick.rotation]\nepochs = "many"', "epochs must be int"),
        ("table1", "[presets.quick.rotation]\nlearning_rate = nan", "must be a finite number"),
        ("table1", "[presets.quick.rotation]\nstep_epochs = [2, 2.5]", "must be a list of integers"),
        ("table1", "[presets.quick.rotaton]\nepochs = 3", "unknown section \\[presets.quick.rotaton\\]"),
        ("table1", "[presets.fast.rotation]\nepochs = 3", "unknown preset in \\[presets.fast\\]"),
        ("table1", "[presets.quick.rotation]\ntrainable = 'head'", "trainable is not a setting of rotation"),
        ("presets", "[quick.clasify]\nepochs = 3", "unknown section \\[quick.clasify\\]"),
        ("presets", "[defaults.rotation]\nwarmup = 3", "unknown setting 'warmup'"),
        ("table1", "title = [unclosed", "not valid TOML"),
    ],
)
def test_mistakes_in_recipe_files_are_refused_with_a_reason(recipe_copy, file, addition, message):
    if file == "presets" and addition.startswith("[defaults.rotation]"):
        text = (recipe_copy / "presets.toml").read_text().replace("[defaults.rotation]\n", addition + "\n")
        (recipe_copy / "presets.toml").write_text(text)
    else:
        with open(recipe_copy / f"{file}.toml", "a") as f:
            f.write("\n" + addition + "\n")
    with pytest.raises(config.RecipeError, match=message):
        config.load("table1", "quick")


def test_rotation_stages_carry_no_classify_settings_and_every_stage_has_every_other():
    for name in config.available():
        for preset in config.PRESETS:
            for stage in config.load(name, preset).stages:
                expected = [k for k, s in config.SETTINGS.items() if stage.task in s.tasks]
                assert list(stage.settings) == expected, (name, preset, stage.name)


def test_probes_recipe_has_one_stage_per_block_probe_and_init_starting_from_its_model():
    recipe = config.load("probes", "quick")
    probe_stages = [s for s in recipe.stages if s.task == "probe"]
    assert len(probe_stages) == 30
    starts = {s.name.rsplit(".", 1)[1]: s.init_stage.name if s.init_stage else None for s in probe_stages}
    assert starts == {"rotation_init": "rotation", "random_init": None, "supervised": "full.random_init"}
    table3 = {s.name: s.key for s in config.load("table3", "quick").stages}
    assert {s.name: s.key for s in recipe.stages[:2]} == {k: table3[k] for k in ("rotation", "full.random_init")}
    stage = probe_stages[3]
    assert (stage.name, stage.settings["block"], stage.settings["probe"]) == (
        "probes.layer1.nonlinear.rotation_init", "layer1", "nonlinear")
    assert "augment" not in stage.settings and "trainable" not in stage.settings


def test_figure1_sweep_is_refused_for_other_recipes():
    with pytest.raises(config.RecipeError, match="a setting of the figure1 recipe, not of table2"):
        config.load("table2", "quick", config.parse_overrides(["figure1.labels_per_class=20"]))
