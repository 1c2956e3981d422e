"""A checkpoint saved under one backend gives the same logits under every other.

The model trains one step under the current backend (in its fast layout:
channels_first / mixed precision / fused BatchNorm where `kerasrot.backend` picks them), is
exported and saved; fresh processes under the other backends load it and
compare logits on a fixed batch.
"""

import importlib.util
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from kerasrot import backend, files, models, training

BACKENDS = [b for b in ("torch", "jax", "tensorflow") if importlib.util.find_spec(b)]
SPEC = {"arch": "resnet18", "num_classes": 10, "stem": "imagenet", "image_size": 32}
SETTINGS = {
    "learning_rate": 0.05, "schedule": "constant", "epochs": 1, "optimizer": "sgd", "momentum": 0.9,
    "nesterov": True, "weight_decay": 5e-3, "label_smoothing": 0.0, "jit_compile": "off",
}

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
    with backend.layout(*backend.resolve()):
        model = models.build_model(**SPEC)
    training.compile_model(model, SETTINGS, steps_per_epoch=1)
    model.train_on_batch(images, labels)
    portable = models.export(model, SPEC)
    files.save_model(portable, path)
    logits = keras.ops.convert_to_numpy(portable.predict_on_batch(images))
    return images, labels, logits


def test_checkpoint_gives_same_logits_and_accuracy_under_every_backend(tmp_path):
    checkpoint = tmp_path / "model.keras"
    images, labels, logits = _train_one_step_and_save(checkpoint)
    np.savez(tmp_path / "batch.npz", images=images)
    script = tmp_path / "predict.py"
    script.write_text(LOAD_AND_PREDICT)
    for other in BACKENDS:
        if other == keras.backend.backend():
            continue
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
    monkeypatch.setattr(backend, "has_gpu", lambda: False)
    monkeypatch.setattr(backend, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert "(AVX512-BF16)" in backend.device_description()
    monkeypatch.setattr(backend, "_cpu_flags", lambda: {"avx2", "fma"})
    assert "(AVX2)" in backend.device_description()
    assert not backend.cpu_has_native_bfloat16()


def test_device_description_names_the_gpu_on_every_backend(monkeypatch):
    # A GPU result says which card made it, whichever backend ran (no GPU here:
    # the backend's own answer is faked).
    import types

    monkeypatch.setattr(backend, "has_gpu", lambda: True)
    fakes = {
        "torch": types.SimpleNamespace(cuda=types.SimpleNamespace(get_device_name=lambda i: "NVIDIA H200")),
        "jax": types.SimpleNamespace(devices=lambda: [types.SimpleNamespace(device_kind="NVIDIA H200")]),
        "tensorflow": types.SimpleNamespace(config=types.SimpleNamespace(
            list_physical_devices=lambda kind: ["gpu:0"],
            experimental=types.SimpleNamespace(get_device_details=lambda d: {"device_name": "NVIDIA H200"}))),
    }
    for backend_name, module in fakes.items():
        monkeypatch.setattr(backend, "name", lambda b=backend_name: b)
        monkeypatch.setitem(sys.modules, backend_name, module)
        assert backend.device_description() == "GPU NVIDIA H200", backend_name


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
