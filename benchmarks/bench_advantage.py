"""Bonus-calibrated group advantage (METHOD.md section 5): the kernel vs a Python loop.

    python benchmarks/bench_advantage.py [--quick] [--device cuda|cpu] [--repeat N] [--out DIR]

The baseline is what a verl-style trainer runs: a per-sample loop that gathers scores into a
dict of lists keyed by group id, torch.mean / torch.std per group, math.comb for the pass@k
bonus, and a second per-sample loop writing each advantage (on CPU, as such code runs).
group_advantage runs the Triton kernel on CUDA and the vectorised torch reference on CPU.
"""
import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/bench_advantage.py`

from benchmarks.harness import Bench, common_args, device_name, nvtx, time_fn  # noqa: E402
from gream_fast.kernels import group_advantage, group_advantage_reference  # noqa: E402

REWARD_LEVELS = [0.0, 0.5, 0.707, 0.866, 0.95, 1.0]
K, EPS = 4, 1e-6
PEAK_BANDWIDTH = [  # (name substring, bytes/s): HBM peak of the card, the broadcast roofline
    ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.04e12), ("A100", 1.56e12),
]


def peak_bandwidth(name: str):
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)


def _comb(a: int, b: int) -> int:
    return 0 if a < 0 or b > a else math.comb(a, b)


def python_loop_advantage(rewards, groups, k=K, eps=EPS, response_mask=None):
    """The baseline, written the way reference trainers write it (per-sample Python loops)."""
    scores = rewards.clone()
    index = groups.tolist()
    id2score, id2mean, id2std, id2bonus = defaultdict(list), {}, {}, {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for idx, group in id2score.items():
        n = len(group)
        if n == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            id2mean[idx] = torch.mean(torch.tensor(group))
            id2std[idx] = torch.std(torch.tensor(group))
        if n < k:
            id2bonus[idx] = (0.0, 0.0)
            continue
        c = sum(1 for s in group if s.item() == 1.0)
        rho = 1 - _comb(n - c, k) / _comb(n, k)
        sigma = math.sqrt(rho * (1 - rho))
        b_plus = (1 - rho) / (sigma + eps)
        b_minus = (1 - rho - _comb(n - c - 1, k - 1) / _comb(n - 1, k - 1)) / (sigma + eps)
        id2bonus[idx] = (b_plus, b_minus)
    for i in range(scores.shape[0]):
        idx = index[i]
        b_plus, b_minus = id2bonus[idx]
        bonus = b_plus if scores[i].item() == 1.0 else b_minus
        scores[i] = (scores[i] - id2mean[idx]) / (id2std[idx] + eps) + bonus
    if response_mask is None:
        return scores
    return scores.unsqueeze(-1) * response_mask


def make_case(sizes, rng: torch.Generator, t=None):
    """rewards drawn from the reward levels, contiguous groups of the given sizes, and an
    optional [R, t] bool response mask with a random length in 1..t per response."""
    sizes = torch.as_tensor(sizes)
    r = int(sizes.sum())
    levels = torch.tensor(REWARD_LEVELS)
    rewards = levels[torch.randint(len(REWARD_LEVELS), (r,), generator=rng)]
    groups = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    mask = None
    if t is not None:
        lengths = torch.randint(1, t + 1, (r,), generator=rng)
        mask = torch.arange(t)[None, :] < lengths[:, None]
    return rewards, groups, mask


def fixed_sizes(r, n):
    return [n] * (r // n) + ([r % n] if r % n else [])


def ragged_sizes(r, rng, lo=1, hi=16):
    sizes = torch.randint(lo, hi + 1, (r // lo + 1,), generator=rng)
    sizes = sizes[: int((sizes.cumsum(0) < r).sum()) + 1]
    sizes[-1] -= int(sizes.sum()) - r  # cut the last group so the total is exactly r
    return sizes.tolist()


def main(argv=None):
    parser = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    bench = Bench("advantage", args)
    dev = bench.device
    rng = torch.Generator().manual_seed(args.seed)
    big_t_rows = 2_560 if args.quick else 16_384
    cases = [  # (label, group sizes, response length T or None)
        ("R=2560 n=10", fixed_sizes(2_560, 10), None),
        ("R=16384 n=10", fixed_sizes(16_384, 10), None),
        ("R=16384 ragged 1..16", ragged_sizes(16_384, rng), None),
        ("R=16384 n=10 T=64", fixed_sizes(16_384, 10), 64),
        (f"R={big_t_rows} n=10 T=1560", fixed_sizes(big_t_rows, 10), 1560),
    ]
    base_repeat = min(args.repeat, 5)  # the Python loop takes 10-100 ms a call
    peak = peak_bandwidth(device_name(dev)) if dev.type == "cuda" else None

    with bench.profiling():
        for label, sizes, t in cases:
            rewards, groups, mask = make_case(sizes, rng, t)
            r_dev, g_dev = rewards.to(dev), groups.to(dev)
            m_dev = None if mask is None else mask.to(dev)
            want = python_loop_advantage(rewards, groups, response_mask=mask)
            got = group_advantage(r_dev, g_dev, K, EPS, response_mask=m_dev).cpu()
            err = (got - want).abs().max().item()
            assert err <= 1e-4, f"{label}: kernel and Python loop differ by {err:.2e}"

            with nvtx(f"advantage/{label}/python-loop"):
                t_base = time_fn(lambda: python_loop_advantage(rewards, groups, response_mask=mask),
                                 warmup=1, repeat=base_repeat)["median"]
            impls = [
                ("torch reference (vectorised)",
                 lambda: group_advantage_reference(r_dev, g_dev, K, EPS, m_dev)),
                ("group_advantage check=True",
                 lambda: group_advantage(r_dev, g_dev, K, EPS, m_dev, check=True)),
                ("group_advantage check=False",
                 lambda: group_advantage(r_dev, g_dev, K, EPS, m_dev, check=False)),
            ]
            r_count = rewards.numel()
            moved = r_count * (rewards.element_size() + groups.element_size() + 4)
            if mask is not None:  # the broadcast: read the mask, write [R, T] float32
                moved = r_count * (rewards.element_size() + groups.element_size()) \
                    + mask.numel() * (mask.element_size() + 4)
            work, unit = (moved / 1e9, "GB/s") if mask is not None else (r_count, "resp/s")
            bench.add(label, "python loop (cpu)", t_base, work=work, unit=unit, baseline=t_base,
                      notes=f"max |diff| vs kernel {err:.1e}")
            for name, fn in impls:
                with nvtx(f"advantage/{label}/{name}"):
                    sec = time_fn(fn, repeat=args.repeat, device=dev,
                                  flush_l2=mask is not None)["median"]
                roof = None
                if mask is not None and peak is not None and "group_advantage" in name:
                    roof = moved / sec / peak
                bench.add(label, f"{name} ({dev.type})", sec, work=work, unit=unit,
                          baseline=t_base, roofline=roof)

    bench.note("ratio = Python-loop time / this time. Rewards float32, groups int64, mask bool.")
    if dev.type == "cuda":
        bench.note("no-mask cases move a few hundred KB: launch-latency bound (a few us), so no "
                   "roofline applies; check=True adds validation kernels and one host sync.")
        bench.note("mask cases: roofline = HBM bandwidth (reads rewards, groups and the mask, "
                   "writes [R, T] float32) over the card's peak "
                   + (f"{peak / 1e12:.2f} TB/s" if peak else "(unknown card: none reported)")
                   + "; L2 flushed before each timed call.")
    else:
        bench.note("on CPU group_advantage runs the vectorised torch reference (float64 "
                   "inside); the Triton kernel and its roofline need --device cuda.")
    bench.finish()


if __name__ == "__main__":
    main()
