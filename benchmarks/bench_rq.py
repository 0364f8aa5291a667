"""RQ-KMeans: one balanced level vs k-means-constrained and scikit-learn; on a GPU, the nearest-
centroid assignment and the whole balanced index vs the plain torch a user would write.

    python benchmarks/bench_rq.py [--quick] [--device cpu|cuda] [--cases level,assign,rq]
                                  [--repeat N] [--out DIR]

Cases:
  level   one balanced level, 20,000 x 256 -> 256 (quick: 5,000 x 64 -> 64), all from the same
          k-means++ centroids: ours (kmeans balanced=True, on --device) vs k-means-constrained
          (the reference's solver: min-cost flow per Lloyd iteration, n_init=1, max_iter=100,
          on the host CPU) vs scikit-learn KMeans (unbalanced, for scale). Both baselines are
          optional imports (requirements-cpu.txt); a missing one is noted, not fatal.
  assign  (CUDA) N x D against 256 centroids, N = 1M, D = 1024 (quick: 200k x 256): torch.cdist
          + argmin, matmul + argmin (fp32, tf32, bf16) vs our fused assign kernel.
  rq      (CUDA) the whole balanced 4 x 256 rq_kmeans of the same N x D vs a plain-torch
          unbalanced RQ (matmul + argmin Lloyd, 20 iterations per level, tf32).
"""
import argparse
import contextlib
import inspect
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/bench_rq.py`

from benchmarks.harness import Bench, common_args, device_name, nvtx, time_fn  # noqa: E402
from gream_fast.index.rq import kmeans, rq_kmeans  # noqa: E402
from gream_fast.kernels.residual_quant import assign, centroid_update, encode  # noqa: E402

SIZES = {  # case: (full, --quick)
    "level": ((20_000, 256, 256), (5_000, 64, 64)),  # N, D, K
    "assign": ((1_000_000, 1024), (200_000, 256)),  # N, D against K_ASSIGN centroids
    "rq": ((1_000_000, 1024), (200_000, 256)),  # N, D; LEVELS x CODEBOOK
}
K_ASSIGN, LEVELS, CODEBOOK, RQ_ITERS = 256, 4, 256, 20
KMC_MAX_ITER, KMC_REF_N_INIT = 100, 3  # the reference's KMeansConstrained settings
PEAK_BF16_DENSE = [  # (name substring, FLOP/s): dense bf16 tensor-core peak of the card
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12),
    ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
]
PEAK_BANDWIDTH = [  # (name substring, bytes/s): HBM peak, the floor for reading x once
    ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("GH200", 4.0e12), ("H200", 4.8e12),
    ("H100", 3.35e12), ("A100-SXM4-80GB", 2.04e12), ("A100", 1.56e12), ("L40S", 0.864e12),
]


def _lookup(table, name):
    return next((v for key, v in table if key in name), None)


@contextlib.contextmanager
def matmul_precision(level: str):
    """"highest" = fp32 (no tensor cores), "high" = tf32 for fp32 matmuls."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Data, initial centroids, objective
# ---------------------------------------------------------------------------------------------
def mixture(n, d, k, seed, device="cpu", modes=None, std=0.6):
    """[n, d] float32 points around Gaussian modes of unequal weight (so the balance
    constraint binds), generated on `device`: k/2 broad ones by default; tight clusters whose
    number is not k (e.g. modes=1.5k, std=0.3) are the shape real item embeddings have."""
    g = torch.Generator(device=device).manual_seed(seed)
    modes = modes or max(2, k // 2)
    centers = torch.randn(modes, d, generator=g, device=device)
    weights = torch.rand(modes, generator=g, device=device) + 0.25
    lab = torch.multinomial(weights, n, replacement=True, generator=g)
    x = centers[lab]
    x += std * torch.randn(n, d, generator=g, device=device)
    return x


LEVEL_DATA = {  # name: mixture() arguments given k
    "mixture": lambda k: {},
    # tight clusters, more and fewer of them than codes (as tests/test_balanced_kmeans.py):
    # the balance must split some clusters and merge parts of others
    "clusters 1.5K": lambda k: {"modes": 3 * k // 2, "std": 0.3},
    "clusters 0.4K": lambda k: {"modes": 2 * k // 5, "std": 0.2},
}


def kmeans_pp(x, k, seed):
    """k-means++ on all of x: the initial centroids every implementation of a case starts from."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    xn = (x * x).sum(1)
    first = int(torch.randint(x.shape[0], (1,), generator=g, device=x.device))
    chosen = [first]
    d = (xn - 2 * x @ x[first] + xn[first]).clamp(min=0)
    for _ in range(1, k):
        i = int(torch.multinomial(d / d.sum(), 1, generator=g))
        chosen.append(i)
        d = torch.minimum(d, (xn - 2 * x @ x[i] + xn[i]).clamp(min=0))
    return x[chosen].clone()


def sse(x, labels, centroids) -> float:
    """Sum of squared distances of each point to its own centroid (float64)."""
    x, c = x.double(), torch.as_tensor(centroids, device=x.device).double()
    labels = torch.as_tensor(labels, device=x.device).long()
    return float(((x - c[labels]) ** 2).sum())


def size_range(labels, k) -> str:
    counts = torch.bincount(torch.as_tensor(labels).long().flatten(), minlength=k)
    return f"sizes {int(counts.min())}..{int(counts.max())}"


def _count(x: int) -> str:
    return f"{x // 1_000_000}M" if x % 1_000_000 == 0 else f"{x / 1000:g}k"


# ---------------------------------------------------------------------------------------------
# Case 1: one balanced level
# ---------------------------------------------------------------------------------------------
def bench_level(bench, args):
    for data in LEVEL_DATA:
        bench_level_on(bench, args, data)


def bench_level_on(bench, args, data):
    n, d, k = SIZES["level"][args.quick]
    lo, hi = n // k - 1, n // k + 1
    dev = bench.device
    case = f"balanced level {_count(n)} x {d} -> {k}, {data}"
    x = mixture(n, d, k, args.seed, **LEVEL_DATA[data](k))
    init = kmeans_pp(x, k, args.seed)
    x_np, init_np = x.numpy(), init.numpy()
    repeat = min(args.repeat, 3 if args.quick else 5)

    # Ours, on --device. The first (untimed) call compiles the kernels on a GPU.
    x_dev, init_dev = x.to(dev), init.to(dev)
    with nvtx("rq/level/ours"):
        t_ours = time_fn(lambda: kmeans(x_dev, k, balanced=True, iters=RQ_ITERS, init=init_dev,
                                        seed=args.seed), warmup=1, repeat=repeat, device=dev)
    codes, cents, stats = kmeans(x_dev, k, balanced=True, iters=RQ_ITERS, init=init_dev,
                                 seed=args.seed)
    codes, cents = codes.cpu(), cents.cpu()
    counts = torch.bincount(codes, minlength=k)
    balanced_ok = int(counts.min()) >= lo and int(counts.max()) <= hi
    sse_ours = sse(x, codes, cents)

    # k-means-constrained: once (it takes tens of seconds at the full size).
    t_kmc = sse_kmc = None
    try:
        from k_means_constrained import KMeansConstrained
    except ImportError:
        bench.note("k-means-constrained is not installed: no reference-solver row "
                   "(pip install -r requirements-cpu.txt)")
    else:
        kmc = KMeansConstrained(n_clusters=k, size_min=lo, size_max=hi, init=init_np.copy(),
                                n_init=1, max_iter=KMC_MAX_ITER, random_state=args.seed)
        with nvtx("rq/level/k-means-constrained"):
            t0 = time.perf_counter()
            kmc.fit(x_np.copy())  # (it shifts a given init array in place: hence the copies)
            t_kmc = time.perf_counter() - t0
        sse_kmc = sse(x, kmc.labels_, kmc.cluster_centers_)
        bench.add(case, "k-means-constrained (cpu)", t_kmc, work=n, unit="points/s",
                  baseline=t_kmc, notes=f"SSE {sse_kmc:.6g}; {size_range(kmc.labels_, k)}; "
                  f"{kmc.n_iter_} iters, {t_kmc / (kmc.n_iter_ + 1):.2f} s per min-cost flow; "
                  f"n_init=1, max_iter={KMC_MAX_ITER}; 1 run")

    ratio_note = "" if t_kmc is None else f"; {t_kmc / t_ours['median']:.3g}x (target >= 50x)"
    within = None if sse_kmc is None else sse_ours <= 1.01 * sse_kmc
    bench.add(case, f"ours kmeans balanced ({dev.type})", t_ours["median"], work=n,
              unit="points/s", baseline=t_kmc,
              notes=f"SSE {sse_ours:.6g}"
              + ("" if sse_kmc is None else f" ({sse_ours / sse_kmc - 1:+.2%} vs k-m-c; "
                 f"within 1%: {'yes' if within else 'NO'})")
              + f"; {size_range(codes, k)}{'' if balanced_ok else ' OUT OF BOUNDS'}; "
              f"{stats['iters']} iters{ratio_note}")

    try:
        from sklearn.cluster import KMeans
    except ImportError:
        bench.note("scikit-learn is not installed: no unbalanced KMeans row")
    else:
        def sk_fit():
            return KMeans(k, init=init_np.copy(), n_init=1, max_iter=KMC_MAX_ITER,
                          algorithm="lloyd").fit(x_np)
        with nvtx("rq/level/scikit-learn"):
            t_sk = time_fn(sk_fit, warmup=0, repeat=repeat)
        sk = sk_fit()
        bench.add(case, "scikit-learn KMeans, unbalanced (cpu)", t_sk["median"], work=n,
                  unit="points/s", baseline=t_kmc,
                  notes=f"SSE {sse(x, sk.labels_, sk.cluster_centers_):.6g} (no size "
                  f"constraint: the unbalanced floor); {size_range(sk.labels_, k)}; "
                  f"{sk.n_iter_} iters")

    bench.note(f"level ({data}): N={n:,}, D={d}, K={k}, sizes must lie in [{lo}, {hi}]; all "
               f"start from the same k-means++ centroids; SSE = sum of squared distances to own "
               f"centroid")
    if t_kmc is not None:
        bench.note(f"level ({data}): the reference runs k-means-constrained with n_init={KMC_REF_N_INIT}, "
                   f"so its real cost is ~{KMC_REF_N_INIT}x: ~{KMC_REF_N_INIT * t_kmc:.0f} s per "
                   f"level here; ours is {t_kmc / t_ours['median']:.3g}x faster than one n_init "
                   f"(target >= 50x: {'met' if t_kmc / t_ours['median'] >= 50 else 'NOT met'}), "
                   f"SSE {sse_ours / sse_kmc - 1:+.2%} (target within 1%: "
                   f"{'met' if within else 'NOT met'}; one case, one local optimum each: "
                   f"tests/test_balanced_kmeans.py compares over several)")
    if data == "mixture":
        bench.note("level: what bounds it: k-means-constrained solves a min-cost flow over N x K "
                   "arcs on the host each iteration (OR-tools SimpleMinCostFlow, one thread; "
                   "N^2 when K grows with N); ours at this size is one N x K matrix product per "
                   "iteration (BLAS) plus compiled passes on that matrix: price rounds (O(N*K) "
                   "each), then shortest paths on the K-cluster graph (O(K^2) each, one per "
                   "point that must move: fewer as Lloyd converges); scikit-learn is BLAS Lloyd")


# ---------------------------------------------------------------------------------------------
# Case 2 (CUDA): nearest-centroid assignment
# ---------------------------------------------------------------------------------------------
def torch_cdist_argmin(x, c):
    return torch.cdist(x, c).argmin(1)


def torch_matmul_argmin(x, c):
    """The usual form: ||c||^2 - 2 x.c (||x||^2 does not change the argmin)."""
    cn = (c.float() * c.float()).sum(1)
    return (cn - 2 * (x @ c.T).float()).argmin(1)


def bench_assign(bench, args):
    n, d = SIZES["assign"][args.quick]
    k, dev = K_ASSIGN, bench.device
    case = f"assign {_count(n)} x {d} vs {k}"
    x = mixture(n, d, 64, args.seed, device=dev)
    c = x[torch.randperm(n, device=dev)[:k]].clone()
    xb, cb = x.bfloat16(), c.bfloat16()
    with matmul_precision("highest"):
        ref = torch_matmul_argmin(x, c)  # fp32 answer the others are compared with

    name = device_name(dev)
    peak, bw = _lookup(PEAK_BF16_DENSE, name), _lookup(PEAK_BANDWIDTH, name)
    flops = 2 * n * k * d
    has_tf32 = "allow_tf32" in inspect.signature(assign).parameters
    impls = [  # (impl, fn, precision, bytes of x read)
        ("torch.cdist + argmin (fp32)", lambda: torch_cdist_argmin(x, c), "highest", 4),
        ("matmul + argmin (fp32)", lambda: torch_matmul_argmin(x, c), "highest", 4),
        ("matmul + argmin (tf32)", lambda: torch_matmul_argmin(x, c), "high", 4),
        ("matmul + argmin (bf16)", lambda: torch_matmul_argmin(xb, cb), "highest", 2),
        ("ours assign (fp32)", lambda: assign(x, c)[0], "highest", 4),
    ]
    if has_tf32:
        impls.append(("ours assign (fp32 in, tf32)", lambda: assign(x, c, allow_tf32=True)[0],
                      "highest", 4))
    impls.append(("ours assign (bf16)", lambda: assign(xb, cb)[0], "highest", 2))

    t_base = None
    for impl, fn, precision, elem in impls:
        with matmul_precision(precision), nvtx(f"rq/assign/{impl}"):
            t = time_fn(fn, warmup=3, repeat=args.repeat, device=dev)["median"]
            agree = float((fn() == ref).float().mean())
        t_base = t_base or t
        floor = "" if bw is None else f"; HBM floor {n * d * elem / bw * 1e3:.2f} ms"
        bench.add(case, impl, t, work=flops / 1e12, unit="TFLOP/s", baseline=t_base,
                  roofline=None if peak is None else flops / peak / t,
                  notes=f"agrees with fp32 argmin on {agree:.2%}{floor}")
    bench.note(f"assign: {2 * n * k * d / 1e12:.3g} TFLOP per call (2 N K D); % roofline is of "
               f"the dense bf16 matrix rate from the spec table, "
               + (f"{peak / 1e12:.0f} TFLOP/s for {name} (floor {flops / peak * 1e3:.2f} ms)"
                  if peak else f"unknown for {name}")
               + "; the issue measured 775 TFLOP/s achievable on an H200 (floor 0.68 ms at 1M x "
               "1024). Target: ours bf16 >= 60% of the matrix rate. fp32 rows are far from it "
               "by nature (no tensor cores); fp32 inputs are also bound by reading x from HBM")
    bench.note("assign: ratio is vs torch.cdist; 'agrees' counts rows whose index equals the "
               "fp32 matmul argmin (tf32/bf16 differ on near-ties)")

    # The other two kernels at the same shape: encode (4 levels, one launch) against the torch
    # loop a user writes, and the centroid update against index_add_ + bincount.
    books = torch.stack([c, c * 0.5, c * 0.25, c * 0.125])

    def torch_encode():
        r = x.clone()
        for cb_l in books:
            a = torch_matmul_argmin(r, cb_l)
            r -= cb_l[a]
        return r

    case_e = f"encode {_count(n)} x {d}, 4 x {k}"
    with matmul_precision("high"), nvtx("rq/encode/torch"):
        t_e = time_fn(torch_encode, repeat=args.repeat, device=dev)["median"]
    with nvtx("rq/encode/ours"):
        t_o = time_fn(lambda: encode(x, books, allow_tf32=True), repeat=args.repeat, device=dev)["median"]
    bench.add(case_e, "torch loop: matmul + argmin + subtract (tf32)", t_e, work=4 * flops / 1e12,
              unit="TFLOP/s", baseline=t_e)
    bench.add(case_e, "ours encode, one launch (tf32)", t_o, work=4 * flops / 1e12,
              unit="TFLOP/s", baseline=t_e, roofline=None if peak is None else 4 * flops / peak / t_o)
    a = ref
    moved = n * d * 4 + n * 8
    case_u = f"centroid update {_count(n)} x {d} -> {k}"
    with nvtx("rq/update/torch"):
        t_u = time_fn(lambda: (torch.zeros(k, d, device=dev).index_add_(0, a, x),
                               torch.bincount(a, minlength=k)), repeat=args.repeat, device=dev)["median"]
    with nvtx("rq/update/ours"):
        t_v = time_fn(lambda: centroid_update(x, a, k), repeat=args.repeat, device=dev)["median"]
    bench.add(case_u, "torch index_add_ + bincount", t_u, work=moved / 1e9, unit="GB/s",
              baseline=t_u)
    bench.add(case_u, "ours centroid_update (atomics)", t_v, work=moved / 1e9, unit="GB/s",
              baseline=t_u, roofline=None if bw is None else moved / bw / t_v)
    bench.note("encode: % roofline of the bf16 matrix rate (tf32 runs at half of it); centroid "
               "update: % of HBM bandwidth (reads x and the codes once), bound by atomics on "
               "K x D sums")


# ---------------------------------------------------------------------------------------------
# Case 3 (CUDA): the whole index
# ---------------------------------------------------------------------------------------------
def torch_rq(x, levels, k, iters, seed):
    """Plain-torch unbalanced RQ: per level, random initial centroids and `iters` Lloyd
    iterations of matmul + argmin (tf32), then subtract. Returns (codes [N, L], residual)."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    r = x.float().clone()
    codes = []
    with matmul_precision("high"):
        for _ in range(levels):
            c = r[torch.randperm(r.shape[0], generator=g, device=x.device)[:k]].clone()
            for _ in range(iters):
                a = torch_matmul_argmin(r, c)
                sums = torch.zeros_like(c).index_add_(0, a, r)
                counts = torch.bincount(a, minlength=k).float()
                c = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
            a = torch_matmul_argmin(r, c)
            r -= c[a]
            codes.append(a)
    return torch.stack(codes, 1), r


def collisions(codes) -> int:
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    return int((counts[inverse] > 1).sum())


def bench_rq(bench, args):
    n, d = SIZES["rq"][args.quick]
    dev = bench.device
    case = f"RQ {LEVELS} x {CODEBOOK} of {_count(n)} x {d}"
    x = mixture(n, d, CODEBOOK, args.seed, device=dev)
    repeat = min(args.repeat, 3)
    lo, hi = n // CODEBOOK - 1, n // CODEBOOK + 1

    with nvtx("rq/full/torch"):
        t_torch = time_fn(lambda: torch_rq(x, LEVELS, CODEBOOK, RQ_ITERS, args.seed), warmup=1,
                          repeat=repeat, device=dev)["median"]
    codes_t, r_t = torch_rq(x, LEVELS, CODEBOOK, RQ_ITERS, args.seed)
    bench.add(case, "plain torch RQ, unbalanced (tf32)", t_torch, work=n, unit="items/s",
              baseline=t_torch, notes=f"residual MSE {float((r_t * r_t).sum(1).mean()):.4g}; "
              f"level-0 {size_range(codes_t[:, 0], CODEBOOK)}; {collisions(codes_t):,} colliding "
              f"items; {RQ_ITERS} iters per level")

    def ours():
        # tf32, like the plain-torch baseline it is compared with
        return rq_kmeans(x, levels=LEVELS, codebook_size=CODEBOOK, balanced=True,
                         iters=RQ_ITERS, seed=args.seed, allow_tf32=True)
    with nvtx("rq/full/ours"):
        t_ours = time_fn(ours, warmup=1, repeat=repeat, device=dev)["median"]
    res = ours()
    counts = torch.bincount(res.codes[:, 0], minlength=CODEBOOK)
    ok = int(counts.min()) >= lo and int(counts.max()) <= hi
    mse = res.stats[-1].get("mse")
    bench.add(case, "ours rq_kmeans balanced", t_ours, work=n, unit="items/s",
              baseline=t_torch, notes=(f"residual MSE {mse:.4g}; " if mse is not None else "")
              + f"level-0 {size_range(res.codes[:, 0], CODEBOOK)}"
              + ("" if ok else " OUT OF BOUNDS") + f"; {res.collisions:,} colliding items; "
              f"iters per level {[s['iters'] for s in res.stats]}")
    target = "" if args.quick else (f" (target < 2 s on an H100/H200: "
                                    f"{'met' if t_ours < 2 else 'NOT met'})")
    bench.note(f"rq: ours balanced {t_ours:.3f} s vs plain torch unbalanced {t_torch:.3f} s"
               f"{target}; the torch baseline runs a fixed {RQ_ITERS} Lloyd iterations per level "
               f"from random rows; ours stops a level when the assignment stops changing")
    bench.note("rq: what bounds it: the assignments (matrix rate, one or more per Lloyd "
               "iteration) and the centroid sums (reading the residuals from HBM)")


def main(argv=None):
    parser = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default="level,assign,rq",
                        help="comma-separated subset of level,assign,rq (assign and rq need CUDA)")
    args = parser.parse_args(argv)
    bench = Bench("rq", args)
    cases = set(args.cases.split(","))
    with bench.profiling():
        if "level" in cases:
            bench_level(bench, args)
        if bench.device.type == "cuda":
            if "assign" in cases:
                bench_assign(bench, args)
            if "rq" in cases:
                bench_rq(bench, args)
        elif cases & {"assign", "rq"}:
            bench.note("assign and rq cases need CUDA (--device cuda): skipped on CPU")
    bench.finish()


if __name__ == "__main__":
    main()
