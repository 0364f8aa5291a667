"""kmeans against the solvers users run today, from the same initial centroids.

balanced=True against k-means-constrained (the reference's solver: min-cost flow per Lloyd
iteration): every cluster size in [N//K - 1, N//K + 1] and a sum of squared distances within 2%
of its; on clustered data (cluster count != K) within 1% over several cases. balanced=False against scikit-learn's KMeans (Lloyd, n_init=1): within 1%.
Sizes are chosen so that k-means-constrained takes well under a second and ours about 10 s
under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).

The 2% is reachable: k-means-constrained's flow minimises the sum of unsquared distances (costs
rounded to 1e-3), not the SSE; the same min-cost flow on squared distances, from the same start,
lands between -1.7% and +0.2% of it on every case below (checked when this test was written).
"""
import numpy as np
import pytest
import torch

# The baselines are in requirements-cpu.txt ("baselines for tests and benchmarks"); without them
# there is nothing to compare against.
KMeansConstrained = pytest.importorskip(
    "k_means_constrained", reason="k-means-constrained (the reference's balanced solver, the "
    "baseline) is not installed: pip install k-means-constrained").KMeansConstrained
sk_cluster = pytest.importorskip(
    "sklearn.cluster", reason="scikit-learn (the unbalanced k-means baseline) is not installed")

from gream_fast.index.rq import kmeans  # noqa: E402

ITERS = 20           # ours: the rq_kmeans default
KMC_MAX_ITER = 100   # k-means-constrained: the reference's setting


def mixture(n, d, k, seed):
    """[n, d] float32 points around ~k/2 Gaussian modes of unequal weight: natural clusters of
    unequal size, so the size constraint binds and the balanced and unbalanced answers differ."""
    rng = np.random.default_rng(seed)
    modes = max(2, k // 2)
    centers = rng.standard_normal((modes, d))
    weights = rng.dirichlet(np.full(modes, 2.0))
    lab = rng.choice(modes, size=n, p=weights)
    return (centers[lab] + 0.6 * rng.standard_normal((n, d))).astype(np.float32)


def clusters(n, d, k, seed, ratio, std):
    """Tight Gaussian clusters whose number (ratio * k) is not the number of codes, of unequal
    weight: the shape real item embeddings have, where the balance must split some clusters
    and merge others."""
    rng = np.random.default_rng(seed)
    m = max(2, int(round(k * ratio)))
    centers = rng.standard_normal((m, d))
    lab = rng.choice(m, size=n, p=rng.dirichlet(np.full(m, 2.0)))
    return (centers[lab] + std * rng.standard_normal((n, d))).astype(np.float32)


def kmeans_pp(x, k, seed):
    """The shared initial centroids (k-means++), float32 [k, d]."""
    init, _ = sk_cluster.kmeans_plusplus(x, k, random_state=seed)
    return init.astype(np.float32)


def sse(x, labels, centroids):
    """Sum of squared distances of each point to its own centroid, in float64."""
    x, c = x.astype(np.float64), np.asarray(centroids, dtype=np.float64)
    return float(((x - c[labels]) ** 2).sum())


def partition_sse(x, labels, k):
    """The k-means objective of the partition alone: each cluster against its own mean."""
    x = x.astype(np.float64)
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, labels, x)
    counts = np.bincount(labels, minlength=k)
    means = sums / np.maximum(counts, 1)[:, None]
    return float(((x - means[labels]) ** 2).sum())


def run_ours(x, k, init, balanced):
    codes, centroids, stats = kmeans(torch.from_numpy(x), k, balanced=balanced, iters=ITERS,
                                     init=torch.from_numpy(init.copy()), seed=0)
    assert codes.dtype == torch.int64 and codes.shape == (x.shape[0],)
    assert centroids.dtype == torch.float32 and centroids.shape == (k, x.shape[1])
    codes, centroids = codes.numpy(), centroids.numpy()
    assert codes.min() >= 0 and codes.max() < k
    assert np.isfinite(centroids).all()
    sizes = np.bincount(codes, minlength=k)
    assert (stats["min_size"], stats["max_size"]) == (sizes.min(), sizes.max()), stats
    assert 1 <= stats["iters"] <= ITERS, stats
    own = sse(x, codes, centroids)
    assert stats["sse"] == pytest.approx(own, rel=1e-3), "stats['sse'] is not the SSE of the " \
        "returned codes against the returned centroids"
    return codes, centroids, sizes


# (N, D, K, seed): several seeds; N not divisible by K; K not a power of two; D not a multiple
# of the kernels' D block; N//K small, where one point of slack matters most. Under the
# interpreter every assign call costs ~10 ms per 64 rows, and the balanced loop makes several
# per Lloyd iteration: hence N <= 800 here.
BALANCED_CASES = [
    (800, 32, 20, 0),
    (800, 32, 20, 1),
    (800, 32, 20, 2),
    (700, 16, 32, 3),    # 700 / 32 = 21.875
    (750, 24, 17, 4),    # 750 / 17 = 44.1
    (600, 16, 25, 5),    # 24 per cluster
]


@pytest.mark.parametrize("n,d,k,seed", BALANCED_CASES)
def test_balanced_matches_k_means_constrained(n, d, k, seed):
    x = mixture(n, d, k, seed)
    init = kmeans_pp(x, k, seed)
    lo, hi = n // k - 1, n // k + 1

    ref = KMeansConstrained(n_clusters=k, size_min=lo, size_max=hi, init=init.copy(),
                            n_init=1, max_iter=KMC_MAX_ITER, random_state=seed)
    ref.fit(x.copy())  # (it shifts an init array it is given in place: hence the copies)
    ref_sizes = np.bincount(ref.labels_, minlength=k)
    assert lo <= ref_sizes.min() and ref_sizes.max() <= hi  # the baseline's own constraint
    # Like with like: each method's codes against its own centroids, and each partition's
    # objective (clusters against their means, which is at most the former).
    ref_sse = sse(x, ref.labels_, ref.cluster_centers_)
    ref_part = partition_sse(x, ref.labels_, k)

    codes, centroids, sizes = run_ours(x, k, init, balanced=True)
    assert sizes.sum() == n
    assert lo <= sizes.min() and sizes.max() <= hi, \
        f"cluster sizes {sizes.min()}..{sizes.max()} outside [{lo}, {hi}]"
    ours_sse = sse(x, codes, centroids)
    ours_part = partition_sse(x, codes, k)
    assert ours_sse <= 1.02 * ref_sse, \
        f"SSE {ours_sse:.6g} vs k-means-constrained {ref_sse:.6g} ({ours_sse / ref_sse - 1:+.2%})"
    assert ours_part <= 1.02 * ref_part, \
        f"partition SSE {ours_part:.6g} vs k-means-constrained {ref_part:.6g}"

    # The constraint costs something on this data (it is not trivially satisfied): the
    # unconstrained optimum from the same start is lower, and its sizes are out of range.
    free = sk_cluster.KMeans(k, init=init.copy(), n_init=1, max_iter=KMC_MAX_ITER,
                             algorithm="lloyd").fit(x)
    free_sizes = np.bincount(free.labels_, minlength=k)
    assert free_sizes.min() < lo or free_sizes.max() > hi


@pytest.mark.parametrize("ratio,std", [(1.5, 0.25), (0.4, 0.2)])
def test_balanced_on_clustered_data_matches_k_means_constrained(ratio, std):
    """On clustered data both land in different local optima case by case (the reference's
    flow minimises unsquared distances, ours the SSE itself), a few % either way; over
    several cases the objectives agree within 1%."""
    ratios = []
    for n, d, k, seed in BALANCED_CASES:
        x = clusters(n, d, k, seed, ratio, std)
        init = kmeans_pp(x, k, seed)
        lo, hi = n // k - 1, n // k + 1
        ref = KMeansConstrained(n_clusters=k, size_min=lo, size_max=hi, init=init.copy(),
                                n_init=1, max_iter=KMC_MAX_ITER, random_state=seed).fit(x.copy())
        codes, centroids, sizes = run_ours(x, k, init, balanced=True)
        assert lo <= sizes.min() and sizes.max() <= hi
        ratios.append(sse(x, codes, centroids) / sse(x, ref.labels_, ref.cluster_centers_))
    mean = float(np.exp(np.mean(np.log(ratios))))
    assert mean <= 1.01, f"SSE / k-means-constrained's, per case: {np.round(ratios, 4)}"
    assert max(ratios) <= 1.10, f"SSE / k-means-constrained's, per case: {np.round(ratios, 4)}"


@pytest.mark.parametrize("n,d,k,seed", [(800, 32, 20, 0), (700, 16, 32, 3), (750, 24, 17, 4)])
def test_unbalanced_matches_scikit_learn(n, d, k, seed):
    x = mixture(n, d, k, seed)
    init = kmeans_pp(x, k, seed)
    # Same algorithm (Lloyd), same start, same iteration cap; tol=0 runs to the fixed point of
    # the assignment, as ours does.
    ref = sk_cluster.KMeans(k, init=init.copy(), n_init=1, max_iter=ITERS, tol=0.0,
                            algorithm="lloyd").fit(x)
    ref_sse = sse(x, ref.labels_, ref.cluster_centers_)

    codes, centroids, _ = run_ours(x, k, init, balanced=False)
    ours_sse = sse(x, codes, centroids)
    assert ours_sse <= 1.01 * ref_sse, \
        f"SSE {ours_sse:.6g} vs scikit-learn {ref_sse:.6g} ({ours_sse / ref_sse - 1:+.2%})"
