"""Run every benchmarks/bench_*.py with --quick, one after another; exit non-zero if any fails.

    python benchmarks/quick.py [--device cuda|cpu] [--out DIR]
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="passed through to every benchmark")
    parser.add_argument("--out", help="passed through to every benchmark")
    args = parser.parse_args(argv)
    extra = [f"--{k}={v}" for k, v in (("device", args.device), ("out", args.out)) if v]
    failed = []
    scripts = sorted(BENCH_DIR.glob("bench_*.py"))
    for script in scripts:
        cmd = [sys.executable, str(script), "--quick", *extra]
        print(f"\n$ {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=BENCH_DIR.parent).returncode  # its output streams through
        print(f"-> {script.name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
        if rc != 0:
            failed.append(script.name)
    print(f"\n{len(scripts) - len(failed)}/{len(scripts)} benchmarks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
