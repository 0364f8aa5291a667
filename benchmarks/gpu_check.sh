#!/usr/bin/env bash
# On a lent GPU machine: build and install the package without touching the machine's torch or
# triton, run the GPU tests and the quick benchmarks, and leave everything under $OUT.
# Budget: under 5 minutes for the tests and quick benchmarks, then the reasoning SRPO step.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONDONTWRITEBYTECODE=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/gpu.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/gpu.txt" || true

# --no-deps/--no-build-isolation: use the machine's torch and pybind11, download nothing.
python -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | tail -n 3

# tests/test_integration_vllm.py's end-to-end test needs vLLM itself (skipped without it)
python -c "import vllm; print('vllm', vllm.__version__)" 2>/dev/null | tee -a "$OUT/gpu.txt" \
  || echo "vllm not installed: test_vllm_generates_real_items skips" | tee -a "$OUT/gpu.txt"

# Only the test files that hold GPU tests (the others may need packages this machine lacks).
files=$(grep -l "mark.gpu" tests/test_*.py)
python -m pytest -m gpu -q -p no:cacheprovider $files 2>&1 | tee "$OUT/pytest-gpu.txt"

# bench_srpo (in quick.py) is the full Qwen3-0.6B, 64 x 10 case with 2 timed steps; its TRL
# baseline runs only where trl==1.16.0 is importable (nothing is downloaded here), else ours
# alone; bench_trl needs TRL for all of its rows.
# bench_serve (in quick.py): `gream-fast serve` over the Qwen3-0.6B shape with static batches,
# 10 and 50 beams, concurrency 1-32; its note says whether the CUDA graph captures stayed flat.
python -c "import trl; print('trl', trl.__version__)" 2>/dev/null | tee -a "$OUT/gpu.txt" \
  || echo "trl not installed: bench_srpo runs without its TRL baseline" | tee -a "$OUT/gpu.txt"
python benchmarks/quick.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.txt"

# The reasoning-mode SRPO step at the Qwen3-0.6B shape (64 prompts x 10, think budget 1,024,
# packs of 65,536 tokens, checkpointing): 2 warm-up + 1 timed step of each side (a TRL step is
# ~1,000 HF decode steps over 640 rows: allow a few minutes).
python benchmarks/bench_srpo.py --mode reasoning --device cuda --quick --repeat 1 --out "$OUT" \
  2>&1 | tee "$OUT/bench-srpo-reasoning.txt"
