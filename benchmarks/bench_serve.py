"""The server under load: `gream-fast serve` in its own process over a random model, a synthetic
catalogue and a random index, loaded by `gream-fast bench-serve` (closed loop, every answer
checked) at each concurrency, for each beam count.

    python benchmarks/bench_serve.py [--quick] [--device cuda|cpu] [--out DIR]

Shapes: CUDA = Qwen3-0.6B in bf16 (random weights: the work per request does not depend on
them), static batches on (KV pool, batch buckets, CUDA graphs captured at warm-up), 10 and 50
beams, histories of 20 items (~200-token prompts), concurrency 1-32; CPU = the demo's tiny Qwen3
(small) in fp32, 10 beams, concurrency 1-16. Rows: time per request at the measured throughput
(1 / req/s), ratio = throughput over concurrency 1's; notes: latency p50 / p99, mean wave size,
invalid items (must be 0) and the CUDA graph captures after warm-up and after the load (must
be equal). What bounds it: at concurrency 1 a wave is one prompt, so decode steps are bound by
per-launch cost (CPU) or by reading the weights once per step (GPU); batching amortises both
over the wave's rows until compute or the KV reads dominate.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Bench, common_args  # noqa: E402

QWEN3_06B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, intermediate_size=3072)


def sizes(args) -> dict:
    if args.device.startswith("cuda"):
        return dict(shape=QWEN3_06B, size="base", items=2000 if args.quick else 20_000,
                    beams=(10, 50), concurrency="1,4,16,32" if args.quick else "1,2,4,8,16,32",
                    requests=32 if args.quick else 128)
    return dict(shape=None, size="small", items=300 if args.quick else 2000, beams=(10,),
                concurrency="1,4" if args.quick else "1,2,4,8,16",
                requests=8 if args.quick else 64)


def build_assets(root: Path, items: int, shape, size: str):
    """root/data (synthetic catalogue), root/index (random codes), root/model (random weights)."""
    import numpy as np

    from gream_fast.data import Dataset
    from gream_fast.data.prepare import prepare, write
    from gream_fast.data.synth import SynthConfig, synthesize
    from gream_fast.index import SemanticIndex
    from gream_fast.model.tiny import build_tiny

    write(prepare(synthesize(SynthConfig(users=max(200, items // 4), items=items,
                                         mean_length=24, seed=0)), k_core=5), root / "data")
    n = Dataset.load(root / "data").num_items
    index = SemanticIndex.from_codes(np.random.default_rng(0).integers(0, 32, (n, 3)), 32)
    (root / "index").mkdir()
    index.save(root / "index" / "index.safetensors")
    build_tiny(root / "data", index, root / "model", size=size, shape=shape)
    return n


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    return sum(float(v) for v in re.findall("^" + re.escape(name) + r" (\S+)$", text, re.M))


def start_server(root: Path, device: str, beams: tuple):
    cmd = [sys.executable, "-m", "gream_fast.cli", "serve", "--model", str(root / "model"),
           "--index", str(root / "index"), "--port", "0", "--device", device,
           "--num-beams", str(beams[0]), "--allowed-beams", ",".join(map(str, beams)),
           "--max-batch-rows", str(32 * max(beams)), "--max-queue", "1024"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"ready at (http://\S+)", line)
        if m:
            return proc, m.group(1)
    raise SystemExit("bench_serve: the server did not start:\n" + "".join(lines[-30:]))


def main(argv=None):
    args = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv)
    from gream_fast.serve.bench import BenchServeConfig, run_bench

    bench = Bench("serve", args)
    sz = sizes(args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = build_assets(root, sz["items"], sz["shape"], sz["size"])
        proc, url = start_server(root, args.device, sz["beams"])
        try:
            captured = metric(url, "gream_cuda_graph_captures")
            for beams in sz["beams"]:
                case = (f"{'qwen3-0.6b bf16' if sz['shape'] else 'tiny-small fp32'}, {n} items, "
                        f"history 20, {beams} beams")
                res = run_bench(BenchServeConfig(
                    url=url, index=str(root / "index"), synthetic=True,
                    num_requests=sz["requests"], concurrency=sz["concurrency"], top_k=10,
                    num_beams=beams, warmup=4), log=print)
                base = 1 / res["levels"][0]["req_per_s"]
                for lv in res["levels"]:
                    bench.add(case, f"serve, concurrency {lv['concurrency']}",
                              1 / lv["req_per_s"], work=1, unit="req/s", baseline=base,
                              notes=f"p50 {lv['p50_ms']} ms, p99 {lv['p99_ms']} ms, mean wave "
                                    f"{lv['mean_batch_size']}, invalid {lv['invalid_items']}, "
                                    f"bad {lv['bad_answers']}")
            after = metric(url, "gream_cuda_graph_captures")
            eager = metric(url, "gream_decode_eager_steps")
            pool = json.loads(urllib.request.urlopen(url + "/v1/info", timeout=30).read())["kv_pool"]
            bench.note("static batches: " + ("off" if pool is None else
                       f"on, KV pool {pool['bytes'] / 2**20:.0f} MiB, {pool['misses']} waves "
                       f"outside it") + f"; CUDA graphs captured at warm-up: {captured:.0f}, "
                       f"after the load: {after:.0f} (flat: {after == captured}); decode steps "
                       f"without a graph after warm-up: {eager:.0f}")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    bench.finish()


if __name__ == "__main__":
    main()
