"""Shared benchmark harness: timing, NVTX ranges, a results table and its JSON record.

Every benchmarks/bench_*.py script does the same four things: parse `common_args`, time each
(case, implementation) with `time_fn`, `Bench.add` a row per result, and `Bench.finish` to
print the table and write one JSON file per run (to --out, and to $OUT when that is set).
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from gream_fast.profiling import phase, trace

BENCH_DIR = Path(__file__).resolve().parent


def time_fn(fn, *, warmup=3, repeat=20, device=None, flush_l2=False) -> dict:
    """Median/min/max seconds of `repeat` calls of `fn()` after `warmup` untimed calls.

    On CUDA each call is bracketed by a pair of events (GPU time, no host sync inside the timed
    region); all pairs are read after one synchronize. flush_l2 overwrites a 256 MiB buffer
    before each call (outside the pair), so memory-bound kernels are not timed out of L2.
    """
    device = torch.device(device or "cpu")
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        scratch = torch.empty(256 << 20, dtype=torch.uint8, device=device) if flush_l2 else None
        torch.cuda.synchronize(device)
        pairs = []
        for _ in range(repeat):
            if scratch is not None:
                scratch.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in pairs]
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "repeat": repeat}


def nvtx(name: str):
    """A named range: a torch-profiler event, and on CUDA an NVTX range pushed directly, so it
    shows in nsys without torch.autograd.profiler.emit_nvtx (and its per-op overhead); the
    engine's own phases are named the same way (gream_fast.profiling)."""
    return phase(name)


def common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true", help="small sizes (CI, gpu_check.sh)")
    parser.add_argument("--out", default=str(BENCH_DIR / "results"),
                        help="directory for the JSON record (also written to $OUT if set)")
    parser.add_argument("--trace", metavar="DIR", default=None,
                        help="run the timed cases under torch.profiler and write a Chrome / "
                             "Perfetto trace (the engine's phases are named ranges) to DIR")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per measurement")
    return parser


def spawn_worker(script, worker: str, args: argparse.Namespace, extra=()) -> dict:
    """Run `script --worker WORKER` (with the common flags of `args`, then `extra`) in a fresh
    interpreter;
    the dict it printed on its last "RESULT {json}" line. Not a fork: a process that has
    already run torch's or numba's thread pools (a test session, for one) can leave a forked
    child waiting forever on a lock one of those threads held; and a CUDA context does not
    survive a fork. The worker times what a user runs: TRITON_INTERPRET is off there."""
    script = Path(script).resolve()
    cmd = [sys.executable, str(script), "--worker", worker, "--device", args.device,
           "--repeat", str(args.repeat), "--out", args.out]
    cmd += ["--quick"] * args.quick + (["--trace", args.trace] if args.trace else []) + [
        str(x) for x in extra]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRITON_INTERPRET": "0",
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run(cmd, cwd=BENCH_DIR.parent, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{script.name}: the {worker} worker failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # platform.processor() is often just "x86_64" on Linux
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} CPUs)"


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


class Bench:
    """Collects result rows for one run of one benchmark script."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.args = name, args
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"{name}: --device {args.device} but CUDA is not available")
        self.rows, self.notes = [], []
        self.stem = f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"

    def add(self, case, impl, seconds, *, work=None, unit=None, baseline=None, roofline=None,
            notes=""):
        """One row. work/unit give the throughput (work per second, e.g. 1e6 "walks/s");
        baseline is the baseline's seconds for this case (ratio = baseline / seconds);
        roofline is the fraction of the hardware bound reached, or None where none applies."""
        self.rows.append({
            "case": case, "impl": impl, "time_ms": seconds * 1e3,
            "throughput": None if work is None else work / seconds, "unit": unit,
            "ratio": None if baseline is None else baseline / seconds,
            "pct_roofline": None if roofline is None else 100.0 * roofline, "notes": notes})

    def note(self, text: str):
        """A line printed under the table and kept in the JSON (what bounds a case, targets)."""
        self.notes.append(text)

    @contextlib.contextmanager
    def profiling(self):
        """Wrap the measured runs: a torch.profiler trace to --trace DIR, a no-op without."""
        if not self.args.trace:
            yield
            return
        Path(self.args.trace).mkdir(parents=True, exist_ok=True)
        with trace(Path(self.args.trace) / f"{self.stem}.trace.json"):
            yield

    def _out_dirs(self):
        dirs = [Path(self.args.out)] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
        dirs = list(dict.fromkeys(d.resolve() for d in dirs))  # --out may be $OUT itself
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        return dirs

    def table(self) -> str:
        head = ["case", "impl", "time ms", "throughput", "unit", "ratio", "% roofline", "notes"]
        body = [[r["case"], r["impl"], _fmt(r["time_ms"], ".3f"), _fmt(r["throughput"], ".4g"),
                 r["unit"] or "", _fmt(r["ratio"], ".1f"), _fmt(r["pct_roofline"], ".1f"),
                 r["notes"]] for r in self.rows]
        width = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        numeric = {2, 3, 5, 6}  # right-align numbers so their magnitudes line up
        lines = []
        for row in [head, *body]:
            cells = [str(x).rjust(w) if i in numeric else str(x).ljust(w)
                     for i, (x, w) in enumerate(zip(row, width))]
            lines.append("  ".join(cells).rstrip())
        lines.insert(1, "  ".join("-" * w for w in width))
        return "\n".join(lines)

    def finish(self) -> list:
        """Print the table and notes; write the JSON record. Returns the paths written."""
        print(f"\n== {self.name} on {device_name(self.device)}"
              f"{' (quick)' if self.args.quick else ''} ==")
        print(self.table())
        for n in self.notes:
            print(f"  * {n}")
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        record = {
            "bench": self.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": device_name(self.device), "device_type": self.device.type,
            "torch": torch.__version__, "triton": triton_version, "git_commit": _git_commit(),
            "args": vars(self.args), "rows": self.rows, "notes": self.notes,
        }
        paths = []
        for d in self._out_dirs():
            path = d / f"{self.stem}.json"
            tmp = path.with_suffix(".json.tmp")  # written whole, then renamed: no half files
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            tmp.replace(path)
            paths.append(str(path))
        print(f"  wrote {', '.join(paths)}")
        return paths
