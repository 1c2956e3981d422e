#!/usr/bin/env bash
# One lease of a lent GPU machine (a short, metered loan of one GPU), prepared
# on a CPU and run as is.
#
#   bash benchmarks/gpu_session.sh prepare           # here, where git is, before the lease
#   bash benchmarks/gpu_session.sh paper RECIPE...   # there: `kerasrot run RECIPE --preset paper`, each in turn
#   bash benchmarks/gpu_session.sh torch|jax|all     # there: the speed checks of each backend
#
# `prepare` refuses a tree whose kerasrot/ or recipes/ differ from HEAD, then
# writes .device/commit-manifest: the commit, then `git ls-files -s` of those
# folders. The machine's copy of .git is still at the commit the session
# started from, so git there calls newer code "-dirty"; kerasrot reads the
# manifest instead (KERASROT_COMMIT_MANIFEST) and records its commit, checked
# file by file against git's blob hashes, in every result's provenance.
#
# `paper` keeps its work directory and results in /tmp/lease, outside the
# copy of the tree: each call gets a fresh copy of the tree, so a folder in
# it does not survive to the next call, even on the same machine.
# The same command sent again resumes the stage it stopped in and skips
# recipes that finished, where the machine is the same. Where it is not, the
# stages that finished still count: every call packs each finished stage's
# result.json into $OUT/paper.tgz (stages/<task>-<key>/), and a call finds
# those carried back in .device/stages/ and copies them into its work
# directory, so `kerasrot run` reuses them (and trains again only a stage
# whose model.keras a stage still to run needs: `kerasrot.runner.stages`).
# Between two calls, here:  tar -xzf /work/.device/N/paper.tgz -C .device stages
# It stops itself after $DEADLINE seconds (default 560), in time to pack.
# $PAPER_ARGS is added to each run (on a CPU, a tiny `--set` run checks the
# script itself).
#
# Planning a lease: the measured times of each part are in results/benchmarks.md,
# "Planning a GPU lease".
#
# Needs, in .device/ (named in `carry`): commit-manifest, the keras, namex and optree wheels
# for CPython 3.12 under whl/, and cifar10-jpeg.tar.gz (imagenette-96px.tar.gz
# for the imagenette recipe). The machine has PyTorch, JAX, NumPy, Pillow,
# click and matplotlib, no Keras and no TensorFlow. Logs go to $OUT.
set -u
part=${1:?prepare, paper, torch, jax or all}
shift
started=$SECONDS

if [ "$part" = prepare ]; then
  if [ -n "$(git status --porcelain -- kerasrot recipes)" ]; then
    echo "kerasrot/ or recipes/ differ from HEAD: commit first, so results name the code that ran" >&2
    exit 1
  fi
  mkdir -p .device
  { git rev-parse HEAD; git ls-files -s -- kerasrot recipes; } > .device/commit-manifest
  echo "commit $(head -1 .device/commit-manifest) in .device/commit-manifest"
  exit 0
fi

export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export KERASROT_COMMIT_MANIFEST=$PWD/.device/commit-manifest
out=${OUT:-/tmp/out}
mkdir -p "$out"
[ -f "$KERASROT_COMMIT_MANIFEST" ] || { echo "no .device/commit-manifest: run the prepare part first" >&2; exit 1; }

if [ ! -d /tmp/site/keras ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
for data in cifar10 imagenette; do
  if [ ! -d /tmp/data/$data ] && ls .device/$data*.tar.gz >/dev/null 2>&1; then
    mkdir -p /tmp/data && tar -xzf .device/$data*.tar.gz -C /tmp/data || exit 1
  fi
done
{
  echo "commit $(head -1 "$KERASROT_COMMIT_MANIFEST"), part $part $*, $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  KERAS_BACKEND=torch python3 -c "import sys, torch, jax, keras; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'jax', jax.__version__, 'keras', keras.__version__)"
  KERAS_BACKEND=torch python3 -c "from kerasrot.runner.provenance import git_commit; print('recorded commit', git_commit())"
} 2>&1 | tee "$out/$part-env.txt"

if [ "$part" = paper ]; then
  deadline=${DEADLINE:-560} lease=/tmp/lease
  for carried in .device/stages/*/result.json; do  # stages finished by an earlier call
    [ -f "$carried" ] || continue
    stage=$lease/wd/stages/$(basename "$(dirname "$carried")")
    [ -f "$stage/result.json" ] || { mkdir -p "$stage" && cp "$carried" "$stage/"; }
  done
  for recipe in "$@"; do
    if [ -f $lease/results/$recipe/paper/metrics.json ]; then
      echo "== $recipe: finished in an earlier call"; continue
    fi
    left=$((deadline - (SECONDS - started)))
    [ "$left" -gt 30 ] || { echo "== $recipe: not started, $left s left"; break; }
    echo "== $recipe: $left s left, $(date -u +%T)"
    # Keras' torch backend (with CUDA graphs) is the default; stopped mid-stage, the next call resumes it.
    KERAS_BACKEND=torch timeout "$left" python3 -m kerasrot run "$recipe" --preset paper \
      --data-dir /tmp/data --workdir $lease/wd --results $lease/results ${PAPER_ARGS:-} 2>&1 | tee -a "$out/paper-run.txt" \
      | grep -v "^Epoch \|time left\|min left"
  done
  mkdir -p $lease/results/histories $lease/stages
  for stage in $lease/wd/stages/*/; do
    name=$(basename "$stage")
    cp "$stage/checkpoints/history.csv" "$lease/results/histories/$name.csv" 2>/dev/null  # a stage in progress
    [ -f "$stage/result.json" ] && mkdir -p "$lease/stages/$name" && cp "$stage/result.json" "$lease/stages/$name/"
  done
  tar -czf "$out/paper.tgz" -C $lease results stages
  echo "== packed $(tar -tzf "$out/paper.tgz" | wc -l) entries, $((SECONDS - started)) s"
  exit 0
fi

# The ResNet18 CIFAR-stem step (or $NETWORKS, e.g. densenet121-cifar,densenet121-imagenet
# to size table4), batch 128 x 4 rotations, bf16, data on the GPU.
bench="python3 benchmarks/throughput.py --networks ${NETWORKS:-resnet18-cifar} --precisions mixed_bfloat16 --skip-pipeline
  --repeats 5 --warmup 2 --steps 20"
seconds=${EPOCH_SECONDS:-150}

paper_epochs() {  # the paper rotation stage inside `kerasrot run`, stopped after $seconds
  local backend=$1
  rm -rf "/tmp/wd-$backend"
  KERAS_BACKEND=$backend timeout "$seconds" python3 -m kerasrot run table1 --preset paper \
    --data-dir /tmp/data --workdir "/tmp/wd-$backend" --results "/tmp/results-$backend" 2>&1 \
    | tee "$out/$backend-run.txt" | tail -25
  cp /tmp/wd-"$backend"/stages/rotation-*/checkpoints/history.csv "$out/$backend-history.csv" 2>/dev/null
  # CSVLogger sorts its columns by name and counts epochs from 0: pick the
  # seconds column by its header and count from 1, as `kerasrot run` prints.
  echo "== $backend seconds of each epoch (epoch, seconds):"
  awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "seconds") s = i; next } s { print $1 + 1, $s }' \
    "$out/$backend-history.csv" 2>/dev/null | head -30
}

if [ "$part" = torch ] || [ "$part" = all ]; then
  # cf+fbn+clk+graph+fit is what `kerasrot run` trains with on a GPU.
  KERAS_BACKEND=torch timeout 240 $bench --variants "${TORCH_VARIANTS:-cf+fbn+graph+fit,cf+fbn+clk+graph+fit}" \
    --headline cf+fbn+clk+graph+fit ${BENCH_ARGS:-} 2>&1 | tee "$out/torch-bench.txt"
  [ "$part" = torch ] && [ "$seconds" -gt 0 ] && paper_epochs torch
fi
if [ "$part" = jax ] || [ "$part" = all ]; then
  KERAS_BACKEND=jax timeout 200 $bench --variants cl+jit+fit --headline cl+jit+fit 2>&1 | tee "$out/jax-bench.txt"
  [ "$seconds" -gt 0 ] && paper_epochs jax
  KERAS_BACKEND=torch timeout 150 $bench --variants cf+fbn+clk+graph+fit --headline cf+fbn+clk+graph+fit --torch-compile \
    2>&1 | tee "$out/torch-compile-bench.txt"
fi
