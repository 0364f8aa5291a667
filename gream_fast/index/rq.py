"""RQ-KMeans (METHOD.md section 2): per level, k-means++ then Lloyd iterations on the residuals,
optionally balanced so every cluster holds n//K - 1 .. n//K + 1 items (the reference's
constraint), then subtract the centroids and go down a level.

Balanced assignment, on the data's own device: the capacity constraints are relaxed with one
price per cluster (a Lagrange multiplier): points go to argmin distance + price (the fused
assign kernel with a bias), and crowded clusters get dearer, empty ones cheaper, for a few
rounds (dual ascent; prices carry over between Lloyd iterations, so later iterations need one
or two rounds). Prices bring the sizes close; an exact greedy repair then moves the points
whose move costs the least squared distance until every size is inside the bounds. It reaches
the bounds exactly, like the reference's min-cost flow, at the price of matrix products
instead of an n^2 solver.

Two ways to run it, chosen by size alone (so a seed gives the same result on every device):
while the N x K distance matrix is small (LOCAL_SEARCH_MAX) it is computed once per Lloyd
iteration and the price rounds, the repair and a polish by moves and swaps (2-cycles of the
min-cost flow) run on it in compiled host loops; above, every price round is one fused assign
kernel launch on the data's device and the repair computes the few distances it needs from x.
"""
from dataclasses import dataclass, field

import numba
import numpy as np
import torch

from gream_fast.errors import InvalidInputError
from gream_fast.kernels.residual_quant import assign, centroid_update


@dataclass
class RQResult:
    codes: torch.Tensor  # [N, L] int64, 0-based
    codebooks: torch.Tensor  # [L, K, D] float32
    stats: list = field(default_factory=list)  # per level: sse, mse, iters, min/max size
    collisions: int = 0  # items sharing all L codes with another (they get a collision level)

    def to_index(self):
        from gream_fast.index.semantic_index import SemanticIndex

        return SemanticIndex.from_codes(self.codes.cpu().numpy(), self.codebooks.shape[1])


def _generator(seed: int) -> torch.Generator:
    # a CPU generator whatever the device: the same seed picks the same points on CPU and GPU
    return torch.Generator().manual_seed(int(seed))


def kmeans_pp(x: torch.Tensor, k: int, seed: int = 0, sample: int = 64) -> torch.Tensor:
    """k-means++ initial centroids [k, D] (float32): each next centroid drawn with probability
    proportional to the squared distance to the nearest one chosen so far. It is sequential in
    k, so it runs on a random subset of sample * k points (Lloyd refines from there)."""
    g = _generator(seed)
    if x.shape[0] > sample * k:
        x = x[torch.randperm(x.shape[0], generator=g)[: sample * k].to(x.device)]
    n = x.shape[0]
    xf = x.float()
    xn = (xf * xf).sum(1)
    chosen = [int(torch.randint(n, (1,), generator=g))]
    d = (xn - 2 * xf @ xf[chosen[0]] + xn[chosen[0]]).clamp(min=0)
    for _ in range(1, k):
        total = float(d.sum())
        if total > 0:
            i = int(torch.multinomial((d / total).cpu(), 1, generator=g))
        else:  # fewer distinct points than k: any point will do
            i = int(torch.randint(n, (1,), generator=g))
        chosen.append(i)
        d = torch.minimum(d, (xn - 2 * xf @ xf[i] + xn[i]).clamp(min=0))
    return xf[chosen].clone()


def size_bounds(n: int, k: int) -> tuple[int, int]:
    """The reference's balance constraint: sizes within [max(1, n//k - 1), n//k + 1]."""
    return max(1, n // k - 1), n // k + 1


@numba.njit(cache=True)
def _apply_moves(points, src, dst, a, counts, lo, hi):
    """Walk candidate moves (cheapest first); take a move when it fixes a bound violation and
    breaks none. Returns how many were taken."""
    taken = 0
    for m in range(points.size):
        i, s, t = points[m], src[m], dst[m]
        if a[i] != s or counts[s] - 1 < lo or counts[t] + 1 > hi:
            continue
        if counts[s] <= hi and counts[t] >= lo:
            continue  # fixes nothing
        a[i] = t
        counts[s] -= 1
        counts[t] += 1
        taken += 1
    return taken


@numba.njit(cache=True, parallel=True)
def _nearest_priced(dist, prices, a, d):
    """a[i] = argmin_j dist[i, j] + prices[j] (first on ties, like torch.min), d[i] its value."""
    for i in numba.prange(dist.shape[0]):
        best, t = np.inf, 0
        for j in range(dist.shape[1]):
            v = dist[i, j] + prices[j]
            if v < best:
                best, t = v, j
        a[i], d[i] = t, best


@numba.njit(cache=True, parallel=True)
def _cheaper_clusters(dist, a, prefer):
    """prefer[i]: the cluster closest to point i when it is closer than i's own, else -1."""
    for i in numba.prange(dist.shape[0]):
        s = a[i]
        best, t = dist[i, s], -1
        for j in range(dist.shape[1]):
            if j != s and dist[i, j] < best:
                best, t = dist[i, j], j
        prefer[i] = t


@numba.njit(cache=True)
def _local_search(dist, a, counts, lo, hi, rounds):
    """Improve a feasible balanced assignment: move a point to a cluster with room when that
    is cheaper, or swap two points between their clusters when that is cheaper for the pair
    (a 2-cycle of the min-cost flow the reference solves). Sizes stay within [lo, hi]."""
    n, k = dist.shape
    members = np.empty(n, np.int64)
    start = np.zeros(k + 1, np.int64)
    prefer = np.empty(n, np.int64)  # each point's cheaper cluster, found once per round
    for rnd in range(rounds):
        changed = 0
        # a point's preference depends on its own cluster only, which changes only when the
        # point itself moves: so all preferences can be found up front, in parallel
        _cheaper_clusters(dist, a, prefer)
        for i in range(n):
            s, t = a[i], prefer[i]
            if t >= 0 and counts[s] > lo and counts[t] < hi:  # a plain move
                a[i] = t
                counts[s] -= 1
                counts[t] += 1
                changed += 1
        # swaps: bucket the points by cluster, then for each point that prefers another
        # cluster, trade places with the member of that cluster for whom it costs least
        start[:] = 0
        for i in range(n):
            start[a[i] + 1] += 1
        for j in range(k):
            start[j + 1] += start[j]
        fill = start[:k].copy()
        for i in range(n):
            members[fill[a[i]]] = i
            fill[a[i]] += 1
        for i in range(n):
            s, t = a[i], prefer[i]
            if t < 0 or t == s:
                continue  # content, or it just moved there
            gain_i = dist[i, s] - dist[i, t]
            bm, bg = -1, -1e30
            for m in range(start[t], start[t + 1]):
                q = members[m]
                if a[q] != t:
                    continue  # moved this round
                g = dist[q, t] - dist[q, s]
                if g > bg:
                    bg, bm = g, q
            if bm >= 0 and gain_i + bg > 1e-9 * (1.0 + abs(dist[i, s])):
                a[i], a[bm] = t, s
                changed += 1
        if changed == 0:
            return rnd
    return rounds


@numba.njit(cache=True, parallel=True)
def _repair_candidates(dist, a, counts, lo, hi, cand_t, cand_cost):
    """Each point's candidate moves: slot 2i, out of a crowded cluster to the cheapest one with
    room; slot 2i+1, out of a cluster that can spare one to the cheapest short cluster.
    cand_cost is the extra squared distance, inf where there is no candidate."""
    room = np.flatnonzero(counts < hi)
    short = np.flatnonzero(counts < lo)
    for i in numba.prange(dist.shape[0]):
        s = a[i]
        for slot, ok, cols in ((2 * i, counts[s] > hi, room), (2 * i + 1, counts[s] > lo, short)):
            best, t = np.inf, -1
            if ok:
                for j in cols:
                    if dist[i, j] < best:
                        best, t = dist[i, j], j
            cand_t[slot] = t
            cand_cost[slot] = best - dist[i, s] if t >= 0 else np.inf


@numba.njit(cache=True)
def _repair_dense(dist, a, counts, lo, hi):
    """_repair on the full distance matrix, in compiled loops: every member of a crowded cluster
    and every member of a cluster that can spare one is a candidate (see _repair_candidates)."""
    n = dist.shape[0]
    cand_t = np.empty(2 * n, np.int64)
    cand_cost = np.empty(2 * n, np.float64)
    while counts.max() > hi or counts.min() < lo:
        _repair_candidates(dist, a, counts, lo, hi, cand_t, cand_cost)
        slots = np.flatnonzero(cand_cost < np.inf)
        slots = slots[np.argsort(cand_cost[slots], kind="mergesort")]
        points = slots // 2
        if _apply_moves(points, a[points], cand_t[slots], a, counts, lo, hi) == 0:
            raise RuntimeError("balanced repair made no progress")  # cannot happen: see bounds


def _repair(x, c, a, own, lo, hi):
    """Exact greedy repair of the sizes: move points out of clusters above hi and into clusters
    below lo, cheapest extra squared distance first, until all sizes are within [lo, hi].
    own: each point's squared distance to its current centroid. For a distance matrix too
    big to hold, candidate distances are computed from x as needed."""
    k = c.shape[0]
    xf = x.float()
    xn, cn = (xf * xf).sum(1), (c * c).sum(1)

    def rows(p, cols=slice(None)):  # distances of points p to centroids cols
        return xn[p, None] - 2 * xf[p] @ c[cols].T + cn[cols][None]
    own = own.clone()
    a_np = a.cpu().numpy().copy()
    counts = np.bincount(a_np, minlength=k).astype(np.int64)
    while counts.max() > hi or counts.min() < lo:
        cand_p, cand_s, cand_t, cand_cost = [], [], [], []
        a_t = torch.from_numpy(a_np).to(x.device)
        over = torch.from_numpy(counts > hi).to(x.device)
        if over.any():  # members of crowded clusters -> their cheapest cluster with room
            # only the members farthest from their centroid, a few times the excess per
            # cluster: the likely cheapest to move, and far fewer distances to compute
            excess = torch.from_numpy(np.maximum(counts - hi, 0)).to(x.device)
            pts = torch.nonzero(over[a_t]).flatten()
            order = torch.argsort(own[pts], descending=True, stable=True)
            order = order[torch.argsort(a_t[pts][order], stable=True)]
            pts = pts[order]
            src = a_t[pts]
            rank = torch.arange(len(pts), device=x.device) - torch.searchsorted(src, src)
            pts = pts[rank < 4 * excess[src] + 8]
            d = rows(pts).clone()
            d[:, torch.from_numpy(counts >= hi).to(x.device)] = float("inf")  # no room there
            best, t = d.min(1)
            cand_p.append(pts), cand_s.append(a_t[pts]), cand_t.append(t)
            cand_cost.append(best - own[pts])
        under = torch.from_numpy(counts < lo).to(x.device)
        if under.any():  # points of clusters that can spare one -> the cheapest short cluster
            short = torch.nonzero(under).flatten()
            donors = torch.nonzero(torch.from_numpy(counts > lo).to(x.device)[a_t]).flatten()
            best, j = rows(donors, short).min(1)
            cand_p.append(donors), cand_s.append(a_t[donors]), cand_t.append(short[j])
            cand_cost.append(best - own[donors])
        order = torch.argsort(torch.cat(cand_cost), stable=True)
        moves = [torch.cat(v)[order].cpu().numpy() for v in (cand_p, cand_s, cand_t)]
        before = a_np.copy()
        if _apply_moves(*moves, a_np, counts, lo, hi) == 0:
            raise RuntimeError("balanced repair made no progress")  # cannot happen: see bounds
        moved = torch.from_numpy(np.flatnonzero(before != a_np)).to(x.device)
        dest = torch.from_numpy(a_np[before != a_np]).to(x.device)
        own[moved] = rows(moved).gather(1, dest[:, None]).squeeze(1)
    return torch.from_numpy(a_np).to(a.device)


LOCAL_SEARCH_MAX = 1 << 26  # N * K up to which the assignment is polished on the full matrix


def balanced_assign(x, c, prices=None, rounds: int | None = None, allow_tf32: bool = False):
    """Assignment with every cluster size in size_bounds(n, k); returns (codes, prices).
    Prices from the previous Lloyd iteration are nearly right: two rounds then, six cold.
    While N * K <= LOCAL_SEARCH_MAX the distance matrix is computed once (one matrix product)
    and serves the price rounds and a final polish by moves and swaps; above, every round is
    one fused assign and there is no polish."""
    n, k = x.shape[0], c.shape[0]
    lo, hi = size_bounds(n, k)
    if rounds is None:
        rounds = 6 if prices is None else 2
    prices = torch.zeros(k, device=x.device) if prices is None else prices
    small = n * k <= LOCAL_SEARCH_MAX  # the same on every device: same seed, same result
    if small:
        # ||x||^2 is the same for every cluster of a row: argmins, prices, repair and polish
        # compare within rows only, so the matrix leaves it out (one matrix product, no passes)
        xf, cf = x.float(), c.float()
        xn = (xf * xf).sum(1)
        dist_np = torch.addmm((cf * cf).sum(1)[None], xf, cf.T, alpha=-2).cpu().numpy()
        a_np, d_np = np.empty(n, np.int64), np.empty(n, np.float32)

        def nearest(p):
            _nearest_priced(dist_np, p.cpu().numpy(), a_np, d_np)
            return torch.from_numpy(a_np.copy()).to(x.device), torch.from_numpy(d_np).to(x.device) + xn
    else:
        def nearest(p):
            return assign(x, c, p, allow_tf32)

    target = n / k
    a, d = nearest(prices)
    # Price step: scaled to the typical distance so it means the same at any scale; halved
    # whenever the imbalance grows (the sign that prices overshoot).
    step = 0.5 * float(d.mean()) / max(target, 1.0) ** 0.5
    best, feasible = (float("inf"), a, prices, d), False
    for r in range(rounds + 1):
        counts = torch.bincount(a, minlength=k)
        if int(counts.max()) <= hi and int(counts.min()) >= lo:
            feasible = True
            break
        off = float((counts - target).abs().sum())
        if off < best[0]:
            best = (off, a, prices, d)
        else:
            step *= 0.5
        if r == rounds:
            break
        prices = prices + step * (counts.float() - target) / target
        a, d = nearest(prices)
    if small:  # repair (when needed) and polish on the host, in compiled loops
        if not feasible:
            a = best[1]
        a_np = a.cpu().numpy().copy()
        counts = np.bincount(a_np, minlength=k).astype(np.int64)
        _repair_dense(dist_np, a_np, counts, lo, hi)
        _local_search(dist_np, a_np, counts, lo, hi, 4)
        a = torch.from_numpy(a_np).to(x.device)
    elif not feasible:
        _, a, p_used, d = best
        a = _repair(x, c.float(), a, d - p_used[a], lo, hi)  # d holds distance + price
    return a, prices


def kmeans(x: torch.Tensor, k: int, balanced: bool = True, iters: int = 20,
           init: torch.Tensor | None = None, seed: int = 0, tol: float = 0.0,
           allow_tf32: bool = False):
    """One level: (codes int64 [N], centroids float32 [k, D], stats). Lloyd iterations from
    k-means++ (or `init`) until fewer than tol * N points change cluster, or `iters`. The
    returned centroids are the means of the returned clusters."""
    n = x.shape[0]
    if x.dim() != 2 or n == 0:
        raise InvalidInputError(f"x: expected [N, D] with N > 0, got {list(x.shape)}")
    if k < 1 or iters < 1:
        raise InvalidInputError(f"k and iters: expected >= 1, got {k} and {iters}")
    if balanced and n < k:
        raise InvalidInputError(f"balanced k-means needs at least k={k} points, got {n}")
    if not torch.isfinite(x).all():
        raise InvalidInputError("x holds NaN or infinite values")
    c = kmeans_pp(x, k, seed) if init is None else init.float().to(x.device).clone()
    prices, prev, it = None, None, 0
    for it in range(1, iters + 1):
        if balanced:
            a, prices = balanced_assign(x, c, prices, allow_tf32=allow_tf32)
        else:
            a, _ = assign(x, c, allow_tf32=allow_tf32)
        sums, counts = centroid_update(x, a, k)
        c = _update(c, sums, counts, x, a)
        changed = n if prev is None else int((a != prev).sum())
        prev = a
        if changed <= tol * n:
            break
    # sums and counts of the last iteration are those of prev, the assignment returned
    xf = x.float()
    sse = float((xf * xf).sum() - ((sums * sums).sum(1) / counts.clamp(min=1)).sum())
    return prev, c, {"sse": max(sse, 0.0), "iters": it, "min_size": int(counts.min()),
                     "max_size": int(counts.max())}


def _update(c, sums, counts, x, a):
    """New centroids: cluster means; an empty cluster is re-seeded at the point farthest from
    its centroid (it then takes that point at the next assignment)."""
    new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
    empty = torch.nonzero(counts == 0).flatten()
    if len(empty):
        far = ((x.float() - new[a]) ** 2).sum(1)
        new[empty] = x[torch.topk(far, len(empty)).indices].float()
    return new


def rq_kmeans(x: torch.Tensor, levels: int = 4, codebook_size: int = 256, balanced: bool = True,
              iters: int = 20, seed: int = 0, tol: float = 0.0,
              allow_tf32: bool = False) -> RQResult:
    """Residual k-means: level l clusters the residuals left by levels < l. allow_tf32 trades
    exact fp32 distances for tf32 tensor cores on a GPU (faster; CPU and GPU results then
    differ by more than ties)."""
    if levels < 1 or codebook_size < 1:
        raise InvalidInputError(f"levels and codebook_size must be >= 1, got {levels}, {codebook_size}")
    r = x.float().clone()
    codes, books, stats = [], [], []
    for level in range(levels):
        a, c, st = kmeans(r, codebook_size, balanced, iters, seed=seed + level, tol=tol,
                          allow_tf32=allow_tf32)
        r -= c[a]
        st.update(level=level, mse=float((r * r).sum(1).mean()))
        codes.append(a)
        books.append(c)
        stats.append(st)
    codes = torch.stack(codes, 1)
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    collisions = int((counts[inverse] > 1).sum())
    return RQResult(codes, torch.stack(books), stats, collisions)
