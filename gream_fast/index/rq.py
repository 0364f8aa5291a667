"""RQ-KMeans (METHOD.md section 2): per level, k-means++ then Lloyd iterations on the residuals,
optionally balanced so every cluster holds n//K - 1 .. n//K + 1 items (the reference's
constraint), then subtract the centroids and go down a level.

Balanced assignment: the capacity constraints are relaxed with one price per cluster (a
Lagrange multiplier): points go to argmin distance + price, and crowded clusters get dearer,
empty ones cheaper, for a few rounds (dual ascent; prices carry over between Lloyd
iterations). Prices bring the sizes close; then, two ways, chosen by size alone (so a seed
gives the same result on every device):
- while the N x K distance matrix fits (DENSE_MAX), it is computed once per Lloyd iteration
  (one matrix product) and the assignment is made exact by successive shortest paths on the
  K-cluster graph (_min_cost_balance): the min-cost assignment within the bounds, the same
  optimum as the reference's min-cost flow over all N x K arcs, in compiled host loops whose
  cost grows with the points that must move, not with N x K;
- above, every price round is one fused assign kernel launch on the data's device and an
  exact greedy repair moves the points whose move costs the least squared distance until
  every size is within the bounds (feasible, not always optimal).
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


@numba.njit(cache=True)
def _move_costs(dist, members, size, s, row, arg):
    """row[t]: the cheapest move of one point of cluster s to cluster t, min over its members
    of dist[i, t] - dist[i, s] (prices aside); arg[t]: that point. inf / -1 when s is empty."""
    row[:] = np.inf
    arg[:] = -1
    for m in range(size[s]):
        i = members[s, m]
        base = dist[i, s]
        for t in range(dist.shape[1]):
            v = dist[i, t] - base
            if v < row[t]:
                row[t] = v
                arg[t] = i


@numba.njit(cache=True)
def _leave(dist, members, size, s, i, row, arg):
    """Point i has left cluster s: the moves it was the cheapest for get their next best."""
    for t in range(dist.shape[1]):
        if arg[t] != i:
            continue
        best, who = np.inf, -1
        for m in range(size[s]):
            q = members[s, m]
            v = dist[q, t] - dist[q, s]
            if v < best:
                best, who = v, q
        row[t], arg[t] = best, who


@numba.njit(cache=True)
def _join(dist, t, i, row, arg):
    """Point i has joined cluster t: it may be t's cheapest move anywhere."""
    base = dist[i, t]
    for u in range(dist.shape[1]):
        v = dist[i, u] - base
        if v < row[u]:
            row[u], arg[u] = v, i


@numba.njit(cache=True)
def _shortest_paths(cost, prices, start, backwards, d, prev, stop):
    """Dense Dijkstra over the clusters, edge u -> v costing cost[u, v] + prices[v] - prices[u]
    (>= 0: every point sits at its argmin of distance + price). From `start`, or (start < 0)
    from the labels already in d; backwards: along the edges' reverse (distances to start).
    Returns the first cluster settled where stop[] is set (-1: none; then all are settled):
    the nearest such one, and every label below its distance is final."""
    k = cost.shape[0]
    done = np.zeros(k, np.bool_)
    prev[:] = -1
    if start >= 0:
        d[:] = np.inf
        d[start] = 0.0
    for _ in range(k):
        u, best = -1, np.inf
        for j in range(k):
            if not done[j] and d[j] < best:
                best, u = d[j], j
        if u < 0:
            return -1
        done[u] = True
        if stop[u] and u != start:
            return u
        for v in range(k):
            if not done[v]:
                c = cost[v, u] + prices[u] - prices[v] if backwards else \
                    cost[u, v] + prices[v] - prices[u]
                c = max(c, 0.0)  # >= 0 but for rounding
                if best + c < d[v]:
                    d[v] = best + c
                    prev[v] = u
    return -1


@numba.njit(cache=True)
def _min_cost_balance(dist, prices, a, lo, hi):
    """The min-cost assignment with every cluster size in [lo, hi], exactly (up to ties),
    from an assignment at argmin(dist + prices): successive shortest paths on the K-node graph
    whose edge u -> v moves the cheapest point of u to v. A path out of a crowded cluster to
    one with room (or into a short one from one that can spare) moves one point per edge;
    once the sizes fit, paths of negative real cost from a cluster above lo to one below hi
    are taken until none is left (the optimality condition of the min-cost flow the reference
    solves on all N x K arcs). The prices stay valid potentials, so Dijkstra applies, and are
    returned updated: the next Lloyd iteration starts from them. Returns the paths taken."""
    n, k = dist.shape
    size = np.zeros(k, np.int64)
    for i in range(n):
        size[a[i]] += 1
    # each cluster's members (a path's middle cluster holds one extra point for a moment)
    members = np.empty((k, max(size.max(), hi) + 1), np.int64)
    where = np.empty(n, np.int64)  # each point's slot in its cluster's row
    fill = np.zeros(k, np.int64)
    for i in range(n):
        s = a[i]
        members[s, fill[s]] = i
        where[i] = fill[s]
        fill[s] += 1
    cost = np.empty((k, k))
    arg = np.empty((k, k), np.int64)
    for s in range(k):
        _move_costs(dist, members, size, s, cost[s], arg[s])
    d = np.empty(k)
    prev = np.empty(k, np.int64)
    paths = 0
    while True:
        src, backwards = -1, False
        for j in range(k):
            if size[j] > hi:
                src = j
                break
        if src < 0:
            for j in range(k):
                if size[j] < lo:
                    src, backwards = j, True
                    break
        if src >= 0:  # a forced path: out of a crowded cluster, or into a short one
            stop = size > lo if backwards else size < hi
            end = _shortest_paths(cost, prices, src, backwards, d, prev, stop)
            reach = d[end] if end >= 0 else np.inf
        else:  # sizes fit: a cheaper assignment moves a point from above lo to below hi
            for j in range(k):
                d[j] = prices[j] if size[j] > lo else np.inf
            _shortest_paths(cost, prices, -1, False, d, prev, np.zeros(k, np.bool_))
            end, gain = -1, -1e-9 * (1.0 + np.abs(prices).max())
            for j in range(k):
                if size[j] < hi and prev[j] >= 0 and d[j] - prices[j] < gain:
                    gain, end = d[j] - prices[j], j
            if end < 0:
                return paths
            reach = d[end]
        if end < 0:
            raise RuntimeError("balanced assignment: no path")  # cannot happen: n >= k * lo
        for j in range(k):  # potentials that keep every edge >= 0 and the path's edges at 0
            step = min(d[j], reach)
            prices[j] += step if backwards else -step
        v = end
        while (v != src) if src >= 0 else (prev[v] >= 0):
            u = prev[v]
            s, t = (v, u) if backwards else (u, v)  # one point moves from s to t
            i = arg[s, t]
            last = members[s, size[s] - 1]  # i leaves s: s's last member takes its slot
            members[s, where[i]] = last
            where[last] = where[i]
            size[s] -= 1
            members[t, size[t]] = i
            where[i] = size[t]
            size[t] += 1
            a[i] = t
            _leave(dist, members, size, s, i, cost[s], arg[s])
            _join(dist, t, i, cost[t], arg[t])
            v = u
        paths += 1


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


DENSE_MAX = 1 << 26  # N * K up to which the N x K distance matrix is held (the exact path)
HAND_OFF = 0.03  # price rounds stop once fewer than this fraction of the points must move
# On the matrix a price round costs about as much as ~150 shortest paths (each moves a point
# per edge): the rounds go on, up to MAX_ROUNDS, while two of them take at least STALL * N of
# the points that must move off the paths' hands, and stop once they stall (as they do for
# most of a level on tight clusters fewer than the codes).
MAX_ROUNDS = 40
STALL = 0.01


def balanced_assign(x, c, prices=None, rounds: int | None = None, allow_tf32: bool = False):
    """Assignment with every cluster size in size_bounds(n, k); returns (codes, prices).
    While N * K <= DENSE_MAX: the min-cost such assignment (price rounds on the distance
    matrix until few points must move or the rounds stall, then shortest paths); the prices
    returned are its dual prices, the next Lloyd iteration's start. Above: price rounds with
    the fused assign kernel (two warm, six cold), then the greedy repair."""
    n, k = x.shape[0], c.shape[0]
    lo, hi = size_bounds(n, k)
    small = n * k <= DENSE_MAX  # the same on every device: same seed, same result
    if rounds is None:
        rounds = MAX_ROUNDS if small else 6 if prices is None else 2
    prices = torch.zeros(k, device=x.device) if prices is None else prices
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
    hand_off = HAND_OFF * n if small else 0.0  # few enough points to move by paths
    must = []  # per round: the points that must move to fit the bounds
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
        must.append(int((counts - hi).clamp(min=0).sum() + (lo - counts).clamp(min=0).sum()))
        stalled = small and r >= 2 and must[-3] - must[-1] < STALL * n
        if r == rounds or must[-1] <= hand_off or stalled:
            break
        prices = prices + step * (counts.float() - target) / target
        a, d = nearest(prices)
    if small:  # the min-cost assignment from the best prices, on the host
        if not feasible:
            a, prices = best[1], best[2]
        a_np = a.cpu().numpy().copy()
        p_np = prices.double().cpu().numpy().copy()
        _min_cost_balance(dist_np, p_np, a_np, lo, hi)
        return torch.from_numpy(a_np).to(x.device), torch.from_numpy(p_np).float().to(x.device)
    if not feasible:
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
