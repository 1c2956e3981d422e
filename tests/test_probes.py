"""Per-block probes: the cached features are the frozen backbone's, and probing never changes it."""

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from kerasrot import models, probes
from kerasrot.pipeline import Batches
from kerasrot.runner.cli import main
from tests.test_cli import TINY


def as_numpy(x):
    return keras.ops.convert_to_numpy(x)


@pytest.fixture(scope="module")
def backbone():
    """A ResNet18 whose BatchNorm statistics are not the initial ones (one training step)."""
    keras.utils.set_random_seed(0)
    model = models.build_model("resnet18", 4, stem="imagenet")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32"), rng.integers(0, 4, 16))
    return model


def test_cached_features_are_the_block_outputs_in_inference_mode_pooled_to_2x2(backbone):
    images = np.random.default_rng(1).integers(0, 255, (10, 32, 32, 3)).astype("uint8")
    features, labels = probes.block_features(backbone, Batches(images, np.arange(10), 4))
    assert labels.tolist() == list(range(10))
    outputs = keras.Model(backbone.input, probes.block_outputs(backbone))(images.astype("float32"), training=False)
    for block in probes.PROBED_BLOCKS:
        maps = as_numpy(outputs[block])  # [N, H, W, C]
        n, h, w, c = maps.shape
        if h > 2:  # mean over each quarter of the map, cells in row-major order
            maps = maps.reshape(n, 2, h // 2, 2, w // 2, c).mean(axis=(2, 4))
        np.testing.assert_allclose(features[block], maps.reshape(n, -1, c), rtol=1e-4, atol=1e-4, err_msg=block)
    # 32x32 through the ImageNet stem: 8x8 maps for stem and layer1, then 4x4, 2x2, 1x1
    assert [features[b].shape[1:] for b in probes.PROBED_BLOCKS] == [(4, 64), (4, 64), (4, 128), (4, 256), (1, 512)]


def test_features_of_an_image_do_not_depend_on_its_batch(backbone):
    # BatchNorm in training mode would normalise with each batch's statistics.
    images = np.random.default_rng(2).integers(0, 255, (9, 32, 32, 3)).astype("uint8")
    together, _ = probes.block_features(backbone, Batches(images, np.zeros(9), 9))
    alone, _ = probes.block_features(backbone, Batches(images, np.zeros(9), 1))
    for block in probes.PROBED_BLOCKS:  # (batch-size-dependent kernels round differently: 1e-3)
        np.testing.assert_allclose(together[block], alone[block], rtol=1e-3, atol=1e-3)


def test_probing_leaves_the_backbone_weights_and_batchnorm_statistics_unchanged(backbone):
    before = {w.path: as_numpy(w).copy() for w in backbone.weights}
    images = np.random.default_rng(3).integers(0, 255, (20, 32, 32, 3)).astype("uint8")
    features, labels = probes.block_features(backbone, Batches(images, np.arange(20) % 10, 8))
    for kind in probes.PROBES:
        head = probes.probe(kind, *features["layer2"].shape[1:], 10)
        head.compile(optimizer=keras.optimizers.SGD(0.5), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        head.fit(features["layer2"], labels, epochs=2, verbose=0)
    assert any("moving_variance" in path for path in before)
    for w in backbone.weights:
        np.testing.assert_array_equal(as_numpy(w), before[w.path], err_msg=w.path)


def test_linear_probe_is_one_linear_layer_and_nonlinear_has_a_hidden_layer():
    linear = probes.probe("linear", 4, 64, 10)
    assert [w.path for w in linear.trainable_weights] == ["probe_logits/kernel", "probe_logits/bias"]
    nonlinear = probes.probe("nonlinear", 4, 64, 10)
    assert nonlinear.get_layer("probe_hidden").kernel.shape == (4 * 64, probes.HIDDEN_UNITS)
    with pytest.raises(ValueError, match="probe must be one of"):
        probes.probe("mlp", 4, 64, 10)


def test_probes_recipe_writes_thirty_probes_a_block_table_and_a_plot(data_root, tmp_path, monkeypatch):
    passes = []
    block_features = probes.block_features
    monkeypatch.setattr(probes, "block_features", lambda *a, **k: passes.append(1) or block_features(*a, **k))
    tiny = [*TINY, "--set", "probe.images_per_class=3", "--set", "probe.test_images_per_class=2",
            "--set", "probe.epochs=1", "--set", "probe.batch_size=8"]
    result = CliRunner().invoke(main, ["run", "probes", "--data-dir", str(data_root), "--workdir", str(tmp_path / "w"),
                                       "--results", str(tmp_path / "r"), *tiny])
    assert result.exit_code == 0, result.output
    (out,) = (tmp_path / "r" / "probes").iterdir()
    metrics = json.loads((out / "metrics.json").read_text())
    keys = {f"probes.{b}.{p}.{i}" for b in probes.PROBED_BLOCKS for p in probes.PROBES
            for i in ("rotation_init", "random_init", "supervised")}
    assert keys <= set(metrics["accuracy"]) and len(keys) == 30
    table = (out / "table.md").read_text()
    for block in probes.PROBED_BLOCKS:
        assert f"\n| {block} | " in table
    assert "| layer2 |" in table and "89.06 |" in table  # the paper's NIN block 2 beside our layer2
    assert (out / "probes.png").stat().st_size > 0
    for name in ("attention.png", "filters.png"):  # recipes/probes.toml's [report.look_inside]
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert len(passes) == 3 * 2  # features computed once per model and split, not once per probe


def test_random_control_is_the_rotation_models_starting_point():
    # The random-init probes read the weights a rotation stage starts training from, in its fast layout or not.
    from kerasrot.runner import speed, stages

    settings = speed.resolve({"model": "resnet18", "stem": "imagenet", "image_size": 32, "data_format": "auto",
                              "precision": "auto", "fused_batchnorm": "auto", "channels_last_kernels": "auto",
                              "jit_compile": "auto"})
    keras.utils.set_random_seed(3)
    rotation_start = stages.network(settings, 4, name="rotation")
    keras.utils.set_random_seed(3)
    random_control = models.build_model("resnet18", 4, "imagenet", 32)
    for a, b in zip(rotation_start.weights, random_control.weights):
        np.testing.assert_array_equal(as_numpy(a), as_numpy(b), err_msg=a.path)
