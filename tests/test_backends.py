"""A checkpoint saved under one backend gives the same logits under every other.

The model trains one step under the current backend in the layout its runs
use (`kerasrot.runner.speed`: channels_first, mixed precision, fused
BatchNorm where it picks them), is saved as runs save it (weights moved into
Keras' default layout); fresh processes under the other backends load it
and compare logits on a fixed batch.
"""

import importlib.util
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from kerasrot import models, training
from kerasrot.runner import device, files, speed, stages
from tests import test_training

OTHER_BACKENDS = [b for b in ("torch", "jax", "tensorflow") if b != keras.backend.backend() and importlib.util.find_spec(b)]
SETTINGS = {**test_training.SETTINGS, "schedule": "constant", "epochs": 1, "jit_compile": "off"}

LOAD_AND_PREDICT = """
import json, sys
import keras, numpy as np
batch = np.load(sys.argv[2])
model = keras.saving.load_model(sys.argv[1], compile=False)
logits = keras.ops.convert_to_numpy(model.predict_on_batch(batch["images"]))
np.save(sys.argv[3], logits)
print(json.dumps({"backend": keras.backend.backend()}))
"""


def _train_one_step_and_save(path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(32, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 10, size=32)
    layout = speed.resolve({"data_format": "auto", "precision": "auto", "fused_batchnorm": "auto",
                            "channels_last_kernels": "auto", "jit_compile": "auto",
                            "model": "resnet18", "stem": "imagenet", "image_size": 32})
    model = stages.network(layout, 10, name="resnet18")
    training.compile_model(model, SETTINGS, steps_per_epoch=1)
    model.train_on_batch(images, labels)
    portable = stages.network(layout, 10, name="resnet18", fast=False)
    models.transfer_weights(model, portable, skip_blocks=())
    files.save_model(portable, path)
    logits = keras.ops.convert_to_numpy(portable.predict_on_batch(images))
    return images, labels, logits


@pytest.mark.skipif(not OTHER_BACKENDS, reason="no other Keras backend is installed")
def test_checkpoint_gives_same_logits_and_accuracy_under_every_backend(tmp_path):
    checkpoint = tmp_path / "model.keras"
    images, labels, logits = _train_one_step_and_save(checkpoint)
    np.savez(tmp_path / "batch.npz", images=images)
    script = tmp_path / "predict.py"
    script.write_text(LOAD_AND_PREDICT)
    for other in OTHER_BACKENDS:
        out = tmp_path / f"logits-{other}.npy"
        env = {**os.environ, "KERAS_BACKEND": other}
        done = subprocess.run(
            [sys.executable, str(script), str(checkpoint), str(tmp_path / "batch.npz"), str(out)],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["backend"] == other
        theirs = np.load(out)
        np.testing.assert_allclose(theirs, logits, atol=1e-4, rtol=1e-4)
        assert np.array_equal(theirs.argmax(-1) == labels, logits.argmax(-1) == labels)


def test_device_description_names_the_cpu_vector_extensions(monkeypatch):
    # VMs report "AMD EPYC" for CPUs that differ 4x in speed; the flags tell them apart.
    monkeypatch.setattr(device, "has_gpu", lambda: False)
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert "(AVX512-BF16)" in device.description()
    assert device.cpu_has_native_bfloat16()
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2", "fma"})
    assert "(AVX2)" in device.description()
    assert not device.cpu_has_native_bfloat16()


def test_importing_kerasrot_turns_on_tensorflows_onednn_kernels():
    # TensorFlow enables oneDNN by itself only on AVX-512 CPUs; without it, its
    # convolutions ran 7.9x slower on AVX2 (kerasrot/__init__.py).
    pytest.importorskip("tensorflow")
    check = ("import kerasrot, tensorflow; from tensorflow.python.util import _pywrap_util_port as port; "
             "print(port.IsMklEnabled())")
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "True"
