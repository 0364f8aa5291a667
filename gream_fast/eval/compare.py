"""Paired comparison of two evaluated models on the same users (METHOD.md section 7).

Each model is one or more evaluation folders (`gream-fast eval --out DIR`, one per seed) holding
eval_SPLIT_rankings.jsonl. A user's value of a metric is its Recall@K / NDCG@K averaged over the
model's seeds and over the splits (validation and test pooled by user: the user, not the
split, is the unit a model is tested on), and the difference is taken user by user, A minus B.
The 95% interval of the mean difference is the percentile bootstrap over users (resampled
with replacement); p_not_better is the bootstrap share of resampled means <= 0 (small: A is
better beyond resampling noise). Users and targets must agree across all folders: a paired
comparison of different users would measure the users.
"""
from pathlib import Path

import numpy as np

from gream_fast.errors import DataError, InvalidInputError
from gream_fast.eval.metrics import target_ranks, user_metrics
from gream_fast.files import iter_jsonl

SPLITS = ("valid", "test")


def read_rankings(folder, split: str, k: int):
    """(users [U], targets [U], ranks [U]: each target's 1-based rank, 0 if absent) of one
    evaluation folder's split, sorted by user."""
    path = Path(folder) / f"eval_{split}_rankings.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no such file; evaluate that split into the folder "
                        f"(gream-fast eval --split {split} --out {folder}) or leave it out "
                        "(--splits)")
    users, targets, ranked = [], [], []
    for n, _, row in iter_jsonl(path):
        where = f"{path}:{n}"
        if not isinstance(row, dict) or not {"user", "target", "ranked"} <= set(row):
            raise DataError(f"{where}: expected an object with user, target and ranked")
        r = row["ranked"]
        if not all(type(x) is int for x in (row["user"], row["target"])) or not (
                isinstance(r, list) and all(type(x) is int for x in r)):
            raise DataError(f"{where}: user and target must be integers and ranked a list of "
                            "integers")
        if len(r) < k:
            raise InvalidInputError(f"{where}: a ranking of {len(r)} items cannot give "
                                    f"metrics@{k}: lower --k or evaluate with more beams")
        users.append(row["user"])
        targets.append(row["target"])
        ranked.append(r[:k])
    if not users:
        raise DataError(f"{path}: no rankings")
    users = np.asarray(users, np.int64)
    if len(np.unique(users)) != len(users):
        raise DataError(f"{path}: user {_first_repeat(users)} is ranked twice")
    order = np.argsort(users, kind="stable")
    ranks = target_ranks(np.asarray(ranked, np.int64), np.asarray(targets, np.int64))
    return users[order], np.asarray(targets, np.int64)[order], ranks[order]


def per_user(folders, splits, k: int):
    """(users [U], recall [U], ndcg [U], {split: (folder, users, targets)}) of one model: each
    user's metrics averaged over the folders (seeds) and the splits it appears in. Every folder
    must hold the same users and targets in each split."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise InvalidInputError("compare: each model needs at least one evaluation folder")
    sums, counts, seen = {}, {}, {}
    for split in splits:
        for folder in folders:
            users, targets, ranks = read_rankings(folder, split, k)
            if split in seen:
                _same_users(seen[split], (folder, users, targets), split)
            else:
                seen[split] = (folder, users, targets)
            for u, r, g in zip(users.tolist(), *user_metrics(ranks, k)):
                sums.setdefault(u, np.zeros(2))[:] += (r, g)
                counts[u] = counts.get(u, 0) + 1
    users = np.asarray(sorted(sums), np.int64)
    values = np.stack([sums[u] / counts[u] for u in users.tolist()])
    return users, values[:, 0], values[:, 1], seen


def compare(a, b, k: int = 10, splits=SPLITS, samples: int = 10_000, seed: int = 0) -> dict:
    """The paired comparison of models a and b (each a list of evaluation folders, seeds):
    the mean Recall@k / NDCG@k of each, and of the per-user difference a - b with its
    bootstrap 95% interval (`samples` resamples of the users, seeded)."""
    if k < 1:
        raise InvalidInputError(f"--k: expected >= 1, got {k}")
    if samples < 100:
        raise InvalidInputError(f"--samples: expected >= 100 bootstrap resamples, got {samples}")
    splits = tuple(splits)
    if not splits or any(s not in SPLITS for s in splits) or len(set(splits)) != len(splits):
        raise InvalidInputError(f"--splits: expected valid and/or test, got {','.join(splits)}")
    ua, ra, na, seen_a = per_user(a, splits, k)
    _, rb, nb, seen_b = per_user(b, splits, k)
    for split in splits:  # the same users with the same targets: a paired comparison
        _same_users(seen_a[split], seen_b[split], split)
    rng = np.random.default_rng(seed)
    picks = [rng.integers(0, len(ua), size=(min(samples - s, 1000), len(ua)))
             for s in range(0, samples, 1000)]  # 1,000 resamples at a time
    out = {"k": k, "splits": list(splits), "users": len(ua), "samples": samples, "seed": seed,
           "a": {"runs": [str(f) for f in a]}, "b": {"runs": [str(f) for f in b]}, "diff": {}}
    for name, xa, xb in ((f"recall@{k}", ra, rb), (f"ndcg@{k}", na, nb)):
        d = xa - xb
        boot = np.concatenate([d[p].mean(1) for p in picks])
        lo, hi = np.percentile(boot, [2.5, 97.5])
        out["a"][name], out["b"][name] = float(xa.mean()), float(xb.mean())
        out["diff"][name] = {"mean": float(d.mean()), "ci95": [float(lo), float(hi)],
                             "p_not_better": float((boot <= 0).mean())}
    return out


def _same_users(first, other, split):
    (fa, ua, ta), (fb, ub, tb) = first, other
    if not np.array_equal(ua, ub):
        only = np.setxor1d(ua, ub)
        raise DataError(f"{fb}: its {split} rankings hold other users than {fa}'s (user "
                        f"{int(only[0])} is in one only): a paired comparison needs every "
                        "folder evaluated on the same users")
    if not np.array_equal(ta, tb):
        u = int(ua[np.argmax(ta != tb)])
        raise DataError(f"{fb}: user {u}'s {split} target differs from {fa}'s: the folders were "
                        "evaluated on different data")


def _first_repeat(values):
    seen = set()
    for v in values.tolist():
        if v in seen:
            return v
        seen.add(v)
