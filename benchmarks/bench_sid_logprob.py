"""Policy log-probs of SID response tokens: sid_logprob (one level's LM-head rows) vs the
full-vocabulary log_softmax + gather a trainer computes otherwise, forward + backward.

    python benchmarks/bench_sid_logprob.py [--quick] [--device cpu|cuda] [--repeat N] [--out DIR]

Shapes: 16,384 response tokens on CUDA (quick, and on CPU: 2,048) against the Qwen3-0.6B head (1024 x 151,936) and
the Qwen3-4B head (2560 x 151,936; not in --quick), bf16 on CUDA, fp32 on CPU; the SID level
holds 256 tokens. Memory: peak CUDA memory above the inputs (on CPU, the size of the logits the
path materialises; both paths also write the head's full [V, H] gradient, which dominates the
slice path's time on CPU). What bounds them: the full path is the [N, V] logits GEMM and its
write/read (HBM); the slice path is a [N, 256] GEMM, ~600x less of both.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/bench_sid_logprob.py`

from benchmarks.harness import Bench, common_args, nvtx, time_fn  # noqa: E402
from gream_fast.kernels.sid_logprob import sid_logprob  # noqa: E402

HEADS = {"qwen3-0.6b": 1024, "qwen3-4b": 2560}
VOCAB, K = 151_936, 256


def full_vocab(hidden, head, tokens):
    return torch.log_softmax(F.linear(hidden, head).float(), -1).gather(1, tokens[:, None]).squeeze(1)


def step(fn, hidden, head, tokens):
    hidden.grad, head.grad = None, None
    fn(hidden, head, tokens).sum().backward()


def main(argv=None):
    args = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv)
    bench = Bench("sid_logprob", args)
    dev = bench.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    n = 2048 if args.quick or dev.type != "cuda" else 16_384
    repeat = min(args.repeat, 3)  # the full-vocabulary baseline takes seconds per call on CPU
    shapes = ["qwen3-0.6b"] if args.quick or dev.type != "cuda" else list(HEADS)
    with bench.profiling():
        for shape in shapes:
            h = HEADS[shape]
            g = torch.Generator(device=dev).manual_seed(0)
            hidden = (torch.randn(n, h, device=dev, generator=g) * 0.1).to(dtype).requires_grad_()
            head = (torch.randn(VOCAB, h, device=dev, generator=g) * 0.02).to(dtype).requires_grad_()
            start = VOCAB - 5 * K  # the first SID level's rows
            tokens = torch.randint(0, K, (n,), device=dev, generator=g)
            case = f"{n // 1024}k tokens, {shape} head ({h} x {VOCAB})"
            runs = {
                "full vocabulary: log_softmax + gather": (
                    lambda: step(full_vocab, hidden, head, tokens + start), n * VOCAB * 4 * 2),
                "sid_logprob (SID-slice normalised)": (
                    lambda: step(lambda x, w, t: sid_logprob(x, w[start:start + K], t),
                                 hidden, head, tokens), n * K * 4 * 2),
            }
            base = None
            for impl, (fn, logits_bytes) in runs.items():
                with nvtx(f"sid_logprob/{impl}"):
                    t = time_fn(fn, warmup=1, repeat=repeat, device=dev)["median"]
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    fn()
                    torch.cuda.synchronize()
                    mem = torch.cuda.max_memory_allocated() - before
                    what = "peak CUDA memory above the inputs"
                else:
                    mem, what = logits_bytes, "fp32 logits + their gradient materialised"
                base = base or (t, mem)
                bench.add(case, impl, t, work=n, unit="tokens/s", baseline=base[0],
                          notes=f"{mem / 2**20:.1f} MiB ({what}); memory ratio "
                                f"{base[1] / max(mem, 1):.0f}x")
    bench.note("target (issue 6): sid_logprob >= 10x faster and < 1/50 of the memory of the "
               "full-vocabulary path at 16k tokens, on an H100/H200")
    return bench.finish()


if __name__ == "__main__":
    main()
