"""Top-K metrics of next-item recommendation (METHOD.md section 6).

Each user has one target item and a ranking of item ids, best first. With rank r (1-based) the
target's first position in the ranking:
  Recall@K = 1 if r <= K else 0;   NDCG@K = 1 / log2(r + 1) if r <= K else 0
(one relevant item, so the ideal DCG is 1). An item id < 0 (an invalid SID) never matches, so it
is a miss wherever it stands. Both are averaged over users.
"""
import numpy as np

from gream_fast.errors import InvalidInputError

DEFAULT_KS = (1, 5, 10)


def check_ks(ks) -> tuple:
    """ks as a tuple of distinct positive ints, in the given order."""
    try:
        out = tuple(int(k) for k in ks)
    except (TypeError, ValueError):
        raise InvalidInputError(f"ks: expected positive integers, got {ks!r}") from None
    if not out or min(out) < 1 or any(k != v for k, v in zip(out, ks)):
        raise InvalidInputError(f"ks: expected one or more positive integers, got {ks!r}")
    if len(set(out)) != len(out):
        raise InvalidInputError(f"ks: expected distinct values, got {ks!r}")
    return out


def target_ranks(ranked_items, targets) -> np.ndarray:
    """1-based rank of each user's target in its ranking, 0 where it is absent: int64 [U]."""
    ranked = _as_int_array(ranked_items, "ranked_items", 2)
    targets = _as_int_array(targets, "targets", 1)
    if ranked.shape[0] != targets.shape[0]:
        raise InvalidInputError(f"ranked_items has {ranked.shape[0]} rows but targets "
                                f"{targets.shape[0]} entries: expected one ranking per target")
    if (targets < 0).any():
        u = int(np.argmax(targets < 0))
        raise InvalidInputError(f"targets[{u}] = {targets[u]}: expected an item id >= 0")
    hit = (ranked == targets[:, None]) & (ranked >= 0)
    return np.where(hit.any(1), hit.argmax(1) + 1, 0).astype(np.int64)


def recall_ndcg(ranked_items, targets, ks=DEFAULT_KS) -> dict:
    """{"recall@K": float, "ndcg@K": float} for each K of `ks`, means over the U users.

    ranked_items: [U, K'] int item ids, best first (numpy, torch or nested lists); K' must be at
    least max(ks). targets: [U] int, the one relevant item of each user."""
    ks = check_ks(ks)
    ranked = _as_int_array(ranked_items, "ranked_items", 2)
    if ranked.shape[0] == 0:
        raise InvalidInputError("ranked_items: no users; metrics need at least one")
    if max(ks) > ranked.shape[1]:
        raise InvalidInputError(f"ks: K={max(ks)} is larger than the ranking width "
                                f"{ranked.shape[1]} of ranked_items")
    rank = target_ranks(ranked, targets)
    out = {}
    for k in ks:
        recall, ndcg = user_metrics(rank, k)
        out[f"recall@{k}"] = float(recall.mean())
        out[f"ndcg@{k}"] = float(ndcg.mean())
    return out


def user_metrics(rank, k: int) -> tuple:
    """Each user's Recall@k and NDCG@k (float64 [U] each) from its target's 1-based rank
    (0: absent; target_ranks)."""
    within = (rank > 0) & (rank <= k)
    return within.astype(np.float64), np.where(within, 1.0 / np.log2(np.maximum(rank, 1) + 1.0),
                                               0.0)


def _as_int_array(x, name: str, ndim: int) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != ndim or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        shape = "[U, K]" if ndim == 2 else "[U]"
        raise InvalidInputError(f"{name}: expected integer item ids shaped {shape}, got dtype "
                                f"{a.dtype} and shape {list(a.shape)}")
    return a.astype(np.int64, copy=False)
