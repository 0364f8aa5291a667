"""Shared-prefix group attention for training: group_attention vs SDPA with the dense [T, T]
group mask, forward and forward + backward, one group (a prompt and its n responses).

    python benchmarks/bench_group_attention.py [--quick] [--device cpu|cuda] [--repeat N] [--out DIR]

Shapes. CUDA: the Qwen3-0.6B attention (16 query heads, 8 KV heads, D = 128), bf16, prompt
P = 768, n = 10 responses of R in {64, 512, 1560} tokens (the paper's shape: T = 16,368). CPU
(where group_attention runs torch's fused attention per group): fp32, 4 / 2 heads, D = 32, (P, n, R) in
(256, 8, 64), (256, 8, 256), (768, 10, 512) (--quick: P = 64, n = 4, R in {16, 64}).

The baseline is what a trainer runs today: repeat_kv, then SDPA with the [1, 1, T, T] boolean
group mask (torch picks its kernel; an arbitrary mask rules out FlashAttention, and a masked
kernel computes every one of the T^2 scores). Where the baseline runs out of memory the row says
so and what it would need: the mask (T^2 bytes per group; 64 groups per SRPO step: 64x that)
plus, on SDPA's math path, [Hq, T, T] float32 scores per group and layer.

Columns: time, tokens/s (T per call), ratio to the baseline, and on CUDA the % of the bf16
tensor-core roofline for the useful FLOPs: forward 4 D Hq (P^2/2 + n R P + n R^2/2) (two
matmuls, 2 FLOPs per multiply-add, over the visible pairs), forward + backward 3.5x that (the
backward's five matmuls are 2.5x the forward's two). Memory: on CUDA the peak allocated above
the inputs (torch.cuda.max_memory_allocated); on CPU what autograd saves for the backward
(measured with saved_tensors_hooks), since CPU peak memory is not tracked by torch.

What bounds it: on the GPU both are compute bound (the tensor cores; HBM traffic is ~D / tile
of the FLOPs), and the useful work is a fraction (P^2/2 + n R P + n R^2/2) / (T^2 / 2) of a
causal T x T attention (0.18 at the paper's shape, and the masked baseline computes all T^2):
the speedup bound is ~T^2 / useful. On the CPU both paths are bounded by fp32 matmul throughput
(BLAS) plus, for ours, per-chunk overhead.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/bench_group_attention.py`

from benchmarks.harness import Bench, common_args, device_name, nvtx, time_fn  # noqa: E402
from gream_fast.kernels.group_attention import group_attention, group_layout  # noqa: E402

PEAK_BF16_DENSE = [  # (name substring, FLOP/s): dense bf16 tensor-core peak of the card
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12),
    ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
]


def _lookup(table, name):
    return next((v for key, v in table if key in name), None)


def dense_mask(p, n, r, device):
    """[1, 1, T, T] bool: causal, and a response sees the prompt and its own tokens only."""
    seg = torch.arange(n + 1, device=device).repeat_interleave(
        torch.tensor([p] + [r] * n, device=device))
    i = torch.arange(seg.numel(), device=device)
    ok = (i[None, :] <= i[:, None]) & ((seg[None, :] == 0) | (seg[:, None] == seg[None, :]))
    return ok[None, None]


def sdpa_dense(q, k, v, mask):
    """HF's sdpa path: repeat_kv, [1, H, T, D], SDPA with the mask."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                       v.transpose(0, 1)[None], attn_mask=mask)
    return o[0].transpose(0, 1)


def useful_flops(p, n, r, hq, d):
    return 4 * d * hq * (p * p / 2 + n * r * p + n * r * r / 2)


def saved_bytes(fn):
    """Bytes autograd saves for the backward while fn() runs."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def main(argv=None):
    args = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv)
    bench = Bench("group_attention", args)
    dev = bench.device
    cuda = dev.type == "cuda"
    if cuda:
        dtype, hq, hkv, d = torch.bfloat16, 16, 8, 128
        cases = [(768, 10, r) for r in (64, 512, 1560)]
    else:
        dtype, hq, hkv, d = torch.float32, 4, 2, 32
        cases = ([(64, 4, 16), (64, 4, 64)] if args.quick
                 else [(256, 8, 64), (256, 8, 256), (768, 10, 512)])
    repeat = args.repeat if cuda else min(args.repeat, 5)
    peak = _lookup(PEAK_BF16_DENSE, device_name(dev)) if cuda else None
    with bench.profiling():
        for p, n, r in cases:
            t_len = p + n * r
            layout = group_layout([p], [[r] * n], device=dev)
            g = torch.Generator(device=dev).manual_seed(r)
            q, k, v = (torch.randn(t_len, h, d, device=dev, generator=g).to(dtype)
                       .requires_grad_() for h in (hq, hkv, hkv))
            go = torch.randn(t_len, hq, d, device=dev, generator=g).to(dtype)
            flops = useful_flops(p, n, r, hq, d)
            case = f"P={p} n={n} R={r} (T={t_len})"
            mask = dense_mask(p, n, r, dev)
            impls = {
                f"SDPA + dense [T, T] mask ({mask.numel() / 2**20:.0f} MiB)":
                    lambda: sdpa_dense(q, k, v, mask),
                "group_attention": lambda: group_attention(q, k, v, layout, check=False),
            }
            base_name = next(iter(impls))
            try:
                with torch.no_grad():  # answers agree before anything is timed
                    want = sdpa_dense(q, k, v, mask)
            except torch.cuda.OutOfMemoryError:
                want = None
            if want is not None:
                with torch.no_grad():
                    got = group_attention(q, k, v, layout)
                err = (want.float() - got.float()).abs().max().item()
                if err > (2e-2 if dtype == torch.bfloat16 else 1e-4):
                    raise SystemExit(f"{case}: group_attention differs from SDPA by {err:.3g}")
            want = got = None
            base = {}
            for impl, fwd in impls.items():
                def fwd_bwd(fwd=fwd):
                    q.grad = k.grad = v.grad = None
                    fwd().backward(go)

                for mode, fn, work in (("fwd", fwd, flops), ("fwd+bwd", fwd_bwd, 3.5 * flops)):
                    label = f"{impl} {mode}"
                    try:  # the forward as training runs it: with autograd recording
                        with nvtx(f"group_attention/{label}"):
                            t = time_fn(fn, warmup=1 if not cuda else 3, repeat=repeat,
                                        device=dev)["median"]
                        mem = _memory(fn, cuda)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        need = mask.numel() + hq * t_len * t_len * 4
                        bench.add(case, label, float("nan"), notes=f"out of memory: the mask + "
                                  f"fp32 [Hq, T, T] scores alone are {need / 2**30:.1f} GiB")
                        continue
                    if impl == base_name:
                        base[mode] = t
                    bench.add(case, label, t, work=t_len, unit="tokens/s", baseline=base.get(mode),
                              roofline=None if peak is None else work / t / peak,
                              notes=f"{mem / 2**20:.1f} MiB "
                                    f"{'peak above inputs' if cuda else 'saved for backward'}"
                                    + (f"; {work / t / 1e12:.0f} TFLOP/s useful" if cuda else ""))
            mask = impls = None  # free the mask before the next case's
            if cuda:
                torch.cuda.empty_cache()
    t_paper = 768 + 10 * 1560
    bench.note(f"useful work / causal T x T at the paper's shape (P=768, n=10, R=1560): "
               f"{useful_flops(768, 10, 1560, 1, 1) / (2 * t_paper * t_paper):.3f}; its "
               f"dense mask is {t_paper ** 2 / 1e6:.0f} MB per group "
               f"({64 * t_paper ** 2 / 2**30:.1f} GiB for 64 groups), SDPA math-path scores "
               f"{16 * t_paper ** 2 * 4 / 2**30:.1f} GiB per group and layer (fp32, 16 heads)")
    bench.note("% roofline: useful FLOPs (fwd 4 D Hq (P^2/2 + nRP + nR^2/2), fwd+bwd 3.5x) / "
               "dense bf16 tensor-core peak; the same useful FLOPs for the baseline, which "
               "computes all T^2 scores" if cuda else
               "CPU: group_attention runs torch's fused attention, one causal call per group "
               "over its n sequences [prompt, response i]; no roofline, the "
               "ratio to the baseline only. Memory: bytes autograd saves for backward (the "
               "baseline's include the mask)")
    return bench.finish()


def _memory(fn, cuda):
    if not cuda:  # the forward alone (backward not run): what it keeps for a backward
        return saved_bytes(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


if __name__ == "__main__":
    main()
