#!/usr/bin/env bash
# One lease of a lent GPU machine (DEVELOPERS.md, "GPU issues"): the speed
# checks of the torch and JAX backends, prepared on a CPU and run as is.
#
#   bash benchmarks/gpu_session.sh PART COMMIT
#
# PART: torch (the benchmark's torch rows, then `kerasrot run table1 --preset
# paper` on torch for EPOCH_SECONDS) or jax (the same for JAX, plus the
# torch.compile row). COMMIT: the commit whose code runs (the device machine's
# copy has no .git), printed into every log.
#
# Needs, in .device/ (ignored by .git/info/exclude, named in `carry`): the
# keras, namex and optree wheels for CPython 3.12 under whl/, and
# cifar10-jpeg.tar.gz. The machine has PyTorch, JAX, NumPy, Pillow, click and
# matplotlib, no Keras and no TensorFlow. Logs go to $OUT.
set -u
part=${1:?torch or jax}
commit=${2:?commit}
seconds=${EPOCH_SECONDS:-150}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out=${OUT:-/tmp/out}
mkdir -p "$out"

if [ ! -d /tmp/site/keras ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
if [ ! -d /tmp/data/cifar10 ]; then
  mkdir -p /tmp/data && tar -xzf .device/cifar10-jpeg.tar.gz -C /tmp/data || exit 1
fi
{
  echo "commit $commit, part $part, $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  KERAS_BACKEND=torch python3 -c "import sys, torch, jax, keras; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'jax', jax.__version__, 'keras', keras.__version__)"
} 2>&1 | tee "$out/$part-env.txt"

# The ResNet18 CIFAR-stem step, batch 128 x 4 rotations, bf16, data on the GPU.
bench="python3 benchmarks/throughput.py --networks resnet18-cifar --precisions mixed_bfloat16 --skip-pipeline
  --repeats 5 --warmup 2 --steps 20"

paper_epochs() {  # the paper rotation stage inside `kerasrot run`, stopped after $seconds
  local backend=$1
  rm -rf "/tmp/wd-$backend"
  KERAS_BACKEND=$backend timeout "$seconds" python3 -m kerasrot run table1 --preset paper \
    --data-dir /tmp/data --workdir "/tmp/wd-$backend" --results "/tmp/results-$backend" 2>&1 \
    | tee "$out/$backend-run.txt" | tail -25
  cp /tmp/wd-"$backend"/stages/rotation-*/checkpoints/history.csv "$out/$backend-history.csv" 2>/dev/null
  echo "== $backend history (epoch, seconds):"
  cut -d, -f1- "$out/$backend-history.csv" 2>/dev/null | head -30
}

if [ "$part" = torch ] || [ "$part" = all ]; then
  KERAS_BACKEND=torch timeout 240 $bench --variants "${TORCH_VARIANTS:-cf+fbn,cf+fbn+graph+fit,cf+fbn+clk+graph+fit,cl+fbn+graph+fit}" \
    --headline cf+fbn+graph+fit ${BENCH_ARGS:-} 2>&1 | tee "$out/torch-bench.txt"
  [ "$part" = torch ] && paper_epochs torch
fi
if [ "$part" = jax ] || [ "$part" = all ]; then
  KERAS_BACKEND=jax timeout 200 $bench --variants cl+jit+fit --headline cl+jit+fit 2>&1 | tee "$out/jax-bench.txt"
  paper_epochs jax
  KERAS_BACKEND=torch timeout 150 $bench --variants cf+fbn+graph+fit --headline cf+fbn+graph+fit --torch-compile \
    2>&1 | tee "$out/torch-compile-bench.txt"
fi
