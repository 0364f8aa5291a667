"""RQ-KMeans: balanced sizes exactly within the reference's bounds, sane objective, seeded."""
import numpy as np
import pytest
import torch

from gream_fast import GreamError
from gream_fast.index import rq
from gream_fast.index.rq import kmeans, kmeans_pp, rq_kmeans, size_bounds


def blobs(n, d, centers, seed):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(centers, d, generator=g) * 3
    return mu[torch.randint(0, centers, (n,), generator=g)] + torch.randn(n, d, generator=g)


@pytest.fixture(params=["dense", "streamed"])
def balance_path(request, monkeypatch):
    """Both ways balanced_assign works: on the whole distance matrix (exact, by shortest paths),
    and the large-N way (prices through the fused assign kernel + greedy repair from x)."""
    if request.param == "streamed":
        monkeypatch.setattr(rq, "DENSE_MAX", 0)
    return request.param


@pytest.mark.parametrize("n, k", [(300, 10), (257, 16), (200, 7)])
def test_balanced_sizes_are_within_bounds(n, k, balance_path):
    x = blobs(n, 8, 4, seed=n)  # lopsided blobs: balance has to fight the data
    codes, c, st = kmeans(x, k, balanced=True, iters=4, seed=1)
    lo, hi = size_bounds(n, k)
    sizes = torch.bincount(codes, minlength=k)
    assert lo <= int(sizes.min()) and int(sizes.max()) <= hi
    assert st["min_size"] == int(sizes.min()) and st["max_size"] == int(sizes.max())
    # centroids are the cluster means, and sse is their objective
    for j in range(k):
        torch.testing.assert_close(c[j], x[codes == j].mean(0), atol=1e-4, rtol=1e-4)
    assert st["sse"] == pytest.approx(float(((x - c[codes]) ** 2).sum()), rel=1e-4)


def test_unbalanced_beats_balanced_and_both_beat_random():
    x = blobs(240, 6, 5, seed=2)
    _, _, free = kmeans(x, 8, balanced=False, iters=8, seed=0)
    _, _, bal = kmeans(x, 8, balanced=True, iters=8, seed=0)
    rand = float(((x - x.mean(0)) ** 2).sum())
    assert free["sse"] <= bal["sse"] * 1.001 and bal["sse"] < 0.8 * rand


def test_streamed_balance_is_close_to_dense(monkeypatch):
    """The large-N path repairs greedily, the dense one is exact: within 10% of it here (lopsided
    blobs, where the bounds cost the most)."""
    x = blobs(600, 8, 5, seed=7)
    init = kmeans_pp(x, 12, seed=0)
    _, _, dense = kmeans(x, 12, balanced=True, iters=6, init=init)
    monkeypatch.setattr(rq, "DENSE_MAX", 0)
    _, _, streamed = kmeans(x, 12, balanced=True, iters=6, init=init)
    lo, hi = size_bounds(600, 12)
    assert lo <= streamed["min_size"] and streamed["max_size"] <= hi
    assert dense["sse"] <= streamed["sse"] * 1.001 and streamed["sse"] < dense["sse"] * 1.10


def test_seeded_and_init():
    x = blobs(200, 5, 3, seed=4)
    a1, c1, _ = kmeans(x, 6, seed=3, iters=3)
    a2, c2, _ = kmeans(x, 6, seed=3, iters=3)
    assert torch.equal(a1, a2) and torch.equal(c1, c2)
    init = kmeans_pp(x, 6, seed=9)
    a3, _, _ = kmeans(x, 6, init=init, iters=3, seed=0)
    a4, _, _ = kmeans(x, 6, init=init, iters=3, seed=123)
    assert torch.equal(a3, a4)  # the seed only picks the initial centroids


def test_rq_kmeans_levels_and_index():
    x = blobs(256, 12, 6, seed=5)
    res = rq_kmeans(x, levels=3, codebook_size=16, iters=3, seed=0)
    assert res.codes.shape == (256, 3) and res.codebooks.shape == (3, 16, 12)
    mses = [s["mse"] for s in res.stats]
    assert mses == sorted(mses, reverse=True)  # each level explains more
    recon = sum(res.codebooks[l][res.codes[:, l]] for l in range(3))
    assert float(((x - recon) ** 2).sum(1).mean()) == pytest.approx(mses[-1], rel=1e-4)
    index = res.to_index()
    assert index.num_items == 256 and index.num_collisions == res.collisions
    lo, hi = size_bounds(256, 16)
    for l in range(3):
        sizes = np.bincount(res.codes[:, l].numpy(), minlength=16)
        assert lo <= sizes.min() and sizes.max() <= hi


def test_bad_input():
    with pytest.raises(GreamError, match="at least k=10 points"):
        kmeans(torch.randn(5, 3), 10)
    with pytest.raises(GreamError, match="NaN"):
        kmeans(torch.tensor([[0.0, float("nan")]] * 20), 2)


@pytest.mark.parametrize("n, k, seed", [(200, 7, 0), (257, 16, 1), (300, 10, 2), (96, 32, 3)])
def test_dense_balance_is_the_min_cost_assignment(n, k, seed):
    """On the distance matrix the assignment is the optimum within the size bounds, as an
    exact solver finds it: the Hungarian method over hi slots per cluster, the first lo of
    each made mandatory by a bonus larger than any distance."""
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(seed)
    x = blobs(n, 6, 3, seed=seed)  # three lopsided blobs for k clusters: the bounds bind
    c = x[torch.randperm(n, generator=g)[:k]] + 0.5 * torch.randn(k, 6, generator=g)
    a, prices = rq.balanced_assign(x, c)
    lo, hi = size_bounds(n, k)
    sizes = np.bincount(a.numpy(), minlength=k)
    assert lo <= sizes.min() and sizes.max() <= hi
    dist = torch.cdist(x.double(), c.double()).square().numpy()
    slots = np.repeat(dist, hi, axis=1)
    mandatory = (np.arange(k * hi) % hi) < lo
    rows, cols = linear_sum_assignment(slots - mandatory * (1e6 * dist.max()))
    optimum = dist[rows, cols // hi].sum()
    ours = dist[np.arange(n), a.numpy()].sum()
    assert ours == pytest.approx(optimum, rel=1e-6)
    unconstrained = dist.min(1).sum()
    assert ours > unconstrained * 1.01  # the bounds cost something here
    assert prices.shape == (k,) and torch.isfinite(prices).all()
