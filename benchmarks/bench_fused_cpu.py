"""The fused CPU kernels (gream_fast/model/fused_cpu.py) against the transformers code they replace
inside fused_ops: Qwen3's RMSNorm module and its modeling module's apply_rotary_pos_emb, forward
and forward + backward, float32 on the CPU.

    python benchmarks/bench_fused_cpu.py [--quick] [--repeat N] [--out DIR]

Shapes (tokens T of one packed pass):
  small   the demo's tiny model: hidden 128, 4 query / 2 KV heads of 32, T = 4,064 (an SRPO pass
          of 32 groups); quick: T = 1,024
  0.6b    the Qwen3-0.6B block: hidden 1,024, 16 query / 8 KV heads of 128, T = 2,048 (quick:
          T = 512)
RMSNorm runs on [T, hidden]; the rotary embedding on q [1, Hq, T, D] and k [1, Hkv, T, D] as the
attention calls it (views of the projections' [1, T, heads, D] outputs). fwd: without autograd
(inference); fwd+bwd: the training forward, then its backward.

What bounds it: memory traffic. Each kernel is one pass over its rows, so the reference point
is the time to move its bytes once: each of our rows' notes gives torch's copy_ of the same
number of bytes (read once, write once), measured in this run, and our time over it. At or below
1 a one-pass kernel has nothing left to win (these sizes sit partly in cache, and torch's copy
is not the machine's best, so no % of a DRAM roofline is claimed). HF's code makes a full pass
per op (RMSNorm forward 5, rotary 9 per tensor). Each case checks its answer against the
baseline's before it is timed.
"""
import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/bench_fused_cpu.py`

from benchmarks.harness import Bench, common_args, nvtx, time_fn  # noqa: E402
from gream_fast.model.fused_cpu import rms_norm, rotary  # noqa: E402

SHAPES = {  # name: (hidden, q heads, kv heads, head dim, T, quick T)
    "small": (128, 4, 2, 32, 4064, 1024),
    "0.6b": (1024, 16, 8, 128, 2048, 512),
}


def _copy_floor(nbytes: int, repeat: int) -> float:
    """Seconds to read and write nbytes once (torch's copy_), the floor of a one-pass kernel."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), repeat=repeat)["median"]


def _timed(fn, inputs, grads):
    """fn as a case runs it: without grads, a forward without autograd (inference); with them,
    the training forward, then the backward of those output gradients into inputs."""
    if not grads:
        def forward():
            with torch.no_grad():
                fn()
        return forward

    def forward_backward():
        for t in inputs:
            t.grad = None
        outs = fn()
        torch.autograd.backward(outs if isinstance(outs, tuple) else (outs,), grads)
    return forward_backward


def _check(ours, ref, what):
    for a, b in zip(ours if isinstance(ours, tuple) else (ours,),
                    ref if isinstance(ref, tuple) else (ref,)):
        err = (a - b).abs().max().item()
        assert err <= 1e-4 * max(1.0, b.abs().max().item()), f"{what}: max |ours - HF| {err:.3g}"


def main(argv=None):
    parser = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    args.device = "cpu"  # CPU kernels: record the CPU even where a GPU is present
    bench = Bench("fused_cpu", args)
    modeling = importlib.import_module("transformers.models.qwen3.modeling_qwen3")
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=gen).requires_grad_(grad)

    with bench.profiling():
        for name, (hidden, hq, hkv, d, t_full, t_quick) in SHAPES.items():
            t = t_quick if args.quick else t_full
            # RMSNorm: y = x / rms(x) * w over [T, hidden]
            norm = modeling.Qwen3RMSNorm(hidden, eps=1e-6)
            with torch.no_grad():
                norm.weight.copy_(1 + 0.1 * randn(hidden))
            x, g = randn(t, hidden, grad=True), randn(t, hidden)
            ours = lambda: rms_norm(x, norm.weight, norm.variance_epsilon)  # noqa: E731
            hf = lambda: norm(x)  # noqa: E731
            _check(ours(), hf(), f"rms_norm {name}")
            nbytes = x.numel() * 4
            # (case, ours, HF's, bytes moved at least, inputs, our output grads, HF's)
            cases = [("rms_norm fwd", ours, hf, 2 * nbytes, (), (), ()),  # read x, write y
                     # backward reads g and x, writes dx (dw is one row per thread)
                     ("rms_norm fwd+bwd", ours, hf, 5 * nbytes, (x, norm.weight), (g,), (g,))]
            # rotary: q / k as the attention passes them, cos / sin [1, T, D]
            q = randn(1, t, hq, d).transpose(1, 2).requires_grad_()
            k = randn(1, t, hkv, d).transpose(1, 2).requires_grad_()
            angle = torch.arange(t)[:, None] / 10_000 ** (torch.arange(d // 2) / (d // 2))
            emb = torch.cat([angle, angle], -1)[None]
            cos, sin = emb.cos(), emb.sin()
            fused = modeling.apply_rotary_pos_emb
            flat = lambda a: a.transpose(1, 2).reshape(t, a.shape[1], d)  # noqa: E731
            rot = lambda: (rotary(flat(q), cos[0], sin[0]),  # noqa: E731
                           rotary(flat(k), cos[0], sin[0]))
            hf_rot = lambda: fused(q, k, cos, sin)  # noqa: E731
            _check(rot(), tuple(flat(a) for a in hf_rot()), f"rotary {name}")
            qk_bytes = (q.numel() + k.numel()) * 4
            gq, gk = randn(t, hq, d), randn(t, hkv, d)  # HF's outputs' layout: their transposes
            hf_grads = (gq[None].transpose(1, 2), gk[None].transpose(1, 2))
            cases += [("rotary q,k fwd", rot, hf_rot, 2 * qk_bytes, (), (), ()),
                      ("rotary q,k fwd+bwd", rot, hf_rot, 4 * qk_bytes, (q, k), (gq, gk),
                       hf_grads)]
            for case, mine, theirs, moved, inputs, grads, their_grads in cases:
                mine, theirs = _timed(mine, inputs, grads), _timed(theirs, inputs, their_grads)
                label = f"{case}, {name} (T={t})"
                with nvtx(f"fused_cpu/{label}/hf"):
                    t_hf = time_fn(theirs, repeat=args.repeat)["median"]
                with nvtx(f"fused_cpu/{label}/ours"):
                    t_ours = time_fn(mine, repeat=args.repeat)["median"]
                floor = _copy_floor(moved, args.repeat)
                bench.add(label, "transformers", t_hf, work=t, unit="tokens/s", baseline=t_hf,
                          notes=f"{moved / 2**20:.1f} MiB moved at least")
                bench.add(label, "ours (numba)", t_ours, work=t, unit="tokens/s", baseline=t_hf,
                          notes=f"a copy of the same bytes {floor * 1e3:.3f} ms; ours / copy "
                                f"{t_ours / floor:.2f}")
    bench.note("what bounds it: memory traffic (one pass over the rows): ours / copy compares "
               "our time with torch's copy of the bytes a single pass must move")
    bench.note(f"threads: torch {torch.get_num_threads()}; numba's kernels run parallel over "
               "rows from 65,536 elements, serially below")
    bench.finish()


if __name__ == "__main__":
    main()
