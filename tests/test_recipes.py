import pytest

from kerasrot import recipes


@pytest.mark.parametrize("preset", recipes.PRESETS)
@pytest.mark.parametrize("name", recipes.available())
def test_every_recipe_loads_under_every_preset(name, preset):
    recipe = recipes.load(name, preset)
    assert recipe.stages and recipe.title
    assert all(stage.key for stage in recipe.stages)


def test_all_six_recipes_exist():
    assert recipes.available() == ["figure1", "imagenette", "table1", "table2", "table3", "table4"]


def test_overrides_change_settings_of_their_task_only():
    recipe = recipes.load("table2", "quick", recipes.parse_overrides(["rotation.epochs=3", "classify.nesterov=false"]))
    rotation, *classify = recipe.stages
    assert rotation.settings["epochs"] == 3 and rotation.settings["nesterov"] is True
    assert all(s.settings["nesterov"] is False and s.settings["epochs"] != 3 for s in classify)


@pytest.mark.parametrize(
    "pair,message",
    [
        ("rotation.epochs=-1", "at least 1"),
        ("classify.batch_size=0", "at least 1"),
        ("rotation.learning_rate=fast", "expected float"),
        ("rotation.nesterov=maybe", "expected bool"),
        ("rotation.optimiser=sgd", "unknown setting 'optimiser'"),
        ("epochs=3", "rotation.KEY or classify.KEY"),
        ("rotation.optimizer=rmsprop", "must be one of"),
        ("rotation.epochs", "expected TASK.KEY=VALUE"),
    ],
)
def test_bad_overrides_are_refused_with_a_reason(pair, message):
    with pytest.raises(recipes.RecipeError, match=message):
        recipes.parse_overrides([pair])


def test_unknown_recipe_and_preset_are_refused():
    with pytest.raises(recipes.RecipeError, match="unknown recipe 'table9'"):
        recipes.load("table9")
    with pytest.raises(recipes.RecipeError, match="unknown preset 'fast'"):
        recipes.load("table2", "fast")


def test_rotation_stage_is_shared_between_recipes_and_keys_follow_their_inputs():
    keys = {name: {s.name: s.key for s in recipes.load(name, "quick").stages} for name in ("table1", "table2", "table3", "figure1")}
    assert len({k["rotation"] for k in keys.values()}) == 1
    changed = {s.name: s.key for s in recipes.load("table2", "quick", recipes.parse_overrides(["rotation.epochs=2"])).stages}
    assert changed["rotation"] != keys["table2"]["rotation"]
    # the classify stage that starts from the rotation weights changes with them; the random one does not
    assert changed["last_block.rotation_init"] != keys["table2"]["last_block.rotation_init"]
    assert changed["last_block.random_init"] == keys["table2"]["last_block.random_init"]


def test_figure1_has_one_stage_per_size_and_init():
    recipe = recipes.load("figure1", "paper")
    names = [s.name for s in recipe.stages]
    for n in (20, 100, 400, 1000, 5000):
        assert f"figure1.{n}.rotation_init" in names and f"figure1.{n}.random_init" in names
    sizes = recipes.load("figure1", "quick", recipes.parse_overrides(["figure1.labels_per_class=20"])).stages
    assert [s.name for s in sizes] == ["rotation", "figure1.20.rotation_init", "figure1.20.random_init"]
    assert sizes[1].settings["images_per_class"] == 20
