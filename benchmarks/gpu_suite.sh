#!/usr/bin/env bash
# Everything GPU-related in one run (about 8 minutes on an H100), ending with one table:
#
#   - the gpu- and tensorrt-marked tests of every package and of integration_tests
#   - inference tokens/s of the torch path (bf16, SDPA) vs transformers at batch 64 x seq 512, for a
#     Llama-3.2-1B-shaped random model and for the embedded default's shape   (bench_inference_shapes.py)
#   - a training step's tokens/s/GPU and MFU at seq 512 for the 1B shape, full-length rows and mixed lengths
#     (32..512) padded vs packed                                                      (bench_train_step.py --gpu-only)
#   - inference real tokens/s on the mixed corpus (Cranfield + STS-B), bf16: bidir packed vs padded vs
#     sentence-transformers vs transformers                                          (bench_encode.py)
#   - TensorRT engine vs torch bf16 rows when tensorrt is importable               (bench_backends.py)
#
# It runs on a machine without CUDA too: the tests skip with their reasons and the table says which rows were
# skipped, so the script itself is tested before a GPU is at hand.
#
#   bash benchmarks/gpu_suite.sh     # JSON lines go to $OUT (default runs/gpu_suite/); PYTHON=... picks the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/packages/core/src:$PWD/packages/train/src:$PWD/packages/export/src:$PWD/packages/serve/src${PYTHONPATH:+:$PYTHONPATH}"
export BIDIR_CACHE="${BIDIR_CACHE:-$(mktemp -d)}"
out="${OUT:-runs/gpu_suite}"
mkdir -p "$out" && rm -f "$out"/*.jsonl "$out"/*.xml
status=0
py="${PYTHON:-python3}"   # the interpreter that has torch and the test dependencies

"$py" -c 'import torch; print("torch", torch.__version__, "| cuda:", torch.cuda.is_available() and torch.cuda.get_device_name(0) or "none")'

echo "== gpu- and tensorrt-marked tests"
# One pytest over every test folder. --import-mode=importlib: test files of one name in two folders
# (test_families.py) get distinct module names; it puts no test folder on sys.path, so the folders go on
# PYTHONPATH for their helper modules (the *_testing modules, clis, readme).
tests="packages/core/tests packages/train/tests packages/export/tests packages/serve/tests integration_tests"
PYTHONPATH="$(for t in $tests; do printf '%s:' "$PWD/$t"; done)$PYTHONPATH" "$py" -m pytest $tests -m "gpu or tensorrt" -q -rs \
  -p no:cacheprovider --import-mode=importlib --junit-xml "$out/tests.xml"
rc=$?
[ $rc -eq 0 ] || [ $rc -eq 5 ] || status=1   # 5: nothing collected

echo "== inference throughput"
"$py" benchmarks/bench_inference_shapes.py --json "$out/inference.jsonl" || status=1

echo "== training step"
"$py" benchmarks/bench_train_step.py --gpu-only --json "$out/train_step.jsonl" || status=1

if "$py" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  echo "== packed vs padded inference (mixed corpus)"
  "$py" benchmarks/bench_encode.py --corpora mixed --limit 5000 --dtypes bf16 --kernels flex --json "$out/encode.jsonl" || status=1
fi

if "$py" -c 'import tensorrt' 2>/dev/null && "$py" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  echo "== TensorRT vs torch"
  "$py" benchmarks/bench_backends.py --shapes 64x512 --json "$out/backends.jsonl" || status=1
fi

echo "== summary"
"$py" - "$out" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])

def lines(name):
    path = out / name
    return [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []

rows = []
a = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
for xml in sorted(out.glob("tests*.xml")):
    suite = ET.parse(xml).getroot().find("testsuite")
    for k in a:
        a[k] += int(suite.get(k, 0))
passed = a["tests"] - a["failures"] - a["errors"] - a["skipped"]
rows.append(("gpu/tensorrt tests", f"{passed} passed, {a['failures'] + a['errors']} failed, {a['skipped']} skipped"))
for r in lines("inference.jsonl"):
    rows.append((f"inference {r['shape']} {r['batch']}x{r['seq']} bf16",
                 f"{r['bidir_tokens_per_s']:,.0f} tok/s (transformers {r['transformers_tokens_per_s']:,.0f}, "
                 f"{r['ratio']:.2f}x)"))
if not lines("inference.jsonl"):
    rows.append(("inference 64x512 bf16", "skipped (no CUDA)"))
gpu = [r["gpu"] for r in lines("train_step.jsonl") if r.get("gpu")]
for g in gpu:
    mfu = f"{g['mfu']:.1%}" if g.get("mfu") is not None else "n/a (unknown peak)"
    rows.append((f"train step {g.get('shape', '1B')} seq {g.get('seq', 512)}",
                 f"{g['tokens_per_s_per_gpu']:,.0f} tok/s/GPU, MFU {mfu}"))
    mixed = g.get("mixed")
    for label in ("padded", "packed") if mixed else ():
        m = mixed[label]
        mfu = f"{m['mfu']:.1%}" if m.get("mfu") is not None else "n/a"
        rows.append((f"train step 1B mixed 32..512 {label}", f"{m['tokens_per_s_per_gpu']:,.0f} real tok/s/GPU, MFU {mfu}"
                     + (f" ({mixed['packed_vs_padded']:.2f}x padded, {mixed['kernel']})" if label == "packed" else "")))
if not gpu:
    rows.append(("train step 1B seq 512", "skipped (no CUDA)"))
for r in lines("encode.jsonl"):
    for corpus, c in r["corpora"].items():
        for dtype, paths in c["paths"].items():
            rows.append((f"inference {corpus} corpus {dtype}", ", ".join(f"{k} {v['tokens_per_s']:,.0f}" for k, v in paths.items())
                         + f" real tok/s; packed/padded {paths['bidir packed']['vs_padded']:.2f}x"))
if not lines("encode.jsonl"):
    rows.append(("inference mixed corpus packed vs padded", "skipped (no CUDA)"))
trt = [r for r in lines("backends.jsonl")]
rows.append(("TensorRT vs torch bf16", json.dumps(trt[-1].get("tensorrt", trt[-1])) if trt else "skipped (no tensorrt or no CUDA)"))
width = max(len(k) for k, _ in rows)
for k, v in rows:
    print(f"{k:<{width}}  {v}")
PY
exit $status
