"""Synthetic datasets with planted structure, for benchmarks and tests at any scale.

Items fall into groups; each group has its own vocabulary (titles, descriptions), categories and
brands, so text encoders and semantic IDs have something real to find. Users keep to a few
groups and drift between them, with popular items drawn more often (Zipf within a group), so
sequential recommenders have something to learn.
"""
from dataclasses import dataclass

import numpy as np

from gream_fast.data.readers import RawData
from gream_fast.files import atomic_path

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "zo", "ba", "de", "fu", "gi", "ha",
              "ju", "ki", "ma", "no", "pe", "qui", "ra", "si", "tu", "wo", "xa", "ye", "zu"]
_NOUNS = ["kit", "set", "case", "stand", "cable", "strap", "pack", "guide", "tool", "cover"]


@dataclass
class SynthConfig:
    users: int = 1000
    items: int = 500
    groups: int = 0  # 0: about one group per 50 items
    mean_length: float = 12.0  # interactions per user (at least 5, so a 5-core keeps most)
    stay: float = 0.8  # chance the next item comes from the same group
    seed: int = 0


def _word(rng) -> str:
    return "".join(rng.choice(_SYLLABLES, size=rng.integers(2, 4)))


def synthesize(cfg: SynthConfig) -> RawData:
    """Raw interactions + metadata (as a reader would return them) with planted structure.
    Vectorised: a few seconds for millions of interactions."""
    rng = np.random.default_rng(cfg.seed)
    n_groups = cfg.groups or max(2, cfg.items // 50)
    vocab = np.array([[_word(rng) for _ in range(12)] for _ in range(n_groups)])
    brands = np.array([[_word(rng).capitalize() for _ in range(3)] for _ in range(n_groups)])
    group_of = rng.integers(0, n_groups, size=cfg.items)
    group_of[:n_groups] = np.arange(min(n_groups, cfg.items))  # no group left empty

    # Items: words of their group, drawn all at once.
    w = rng.integers(0, vocab.shape[1], size=(cfg.items, 6))
    nouns = rng.integers(0, len(_NOUNS), size=(cfg.items, 2))
    brand = rng.integers(0, brands.shape[1], size=cfg.items)
    price = np.round(rng.uniform(5, 200, size=cfg.items), 2)
    asin = [f"S{i:09d}" for i in range(cfg.items)]
    meta = {}
    for i in range(cfg.items):
        v = vocab[group_of[i]]
        title = f"{v[w[i, 0]].capitalize()} {v[w[i, 1]]} {_NOUNS[nouns[i, 0]]} {i}"
        desc = (f"A {v[w[i, 2]]} {_NOUNS[nouns[i, 1]]} for {v[w[i, 3]]} and {v[w[i, 4]]} "
                f"lovers, made with {v[w[i, 5]]} care")
        # already clean text, so the record is written as prepare() would leave it
        meta[asin[i]] = {"title": title + ".", "description": desc + ".",
                         "categories": ["Synthetic", f"Group {group_of[i]}"],
                         "brand": str(brands[group_of[i], brand[i]]), "price": float(price[i])}

    # Interactions: each user keeps 3 groups, starts in the first and at each step moves to a
    # random one of them with probability 1 - stay.
    lengths = np.maximum(5, rng.poisson(cfg.mean_length, size=cfg.users))
    n = int(lengths.sum())
    user = np.repeat(np.arange(cfg.users), lengths)
    first = np.zeros(n, bool)
    first[np.cumsum(lengths) - lengths] = True
    own = rng.integers(0, n_groups, size=(cfg.users, min(3, n_groups)))
    while True:  # redraw rows that repeat a group (few rounds: repeats are rare)
        s = np.sort(own, axis=1)
        dup = (s[:, 1:] == s[:, :-1]).any(axis=1)
        if not dup.any():
            break
        own[dup] = rng.integers(0, n_groups, size=(int(dup.sum()), own.shape[1]))
    switch = first | (rng.random(n) > cfg.stay)
    slot = np.where(first, 0, rng.integers(0, own.shape[1], size=n))
    last_switch = np.maximum.accumulate(np.where(switch, np.arange(n), 0))
    group = own[user, slot[last_switch]]
    # Zipf popularity within a group: one sorted key array over all groups, one searchsorted.
    order = np.argsort(group_of, kind="stable")
    rank = np.arange(cfg.items) - np.searchsorted(group_of[order], group_of[order])
    weight = 1.0 / (rank + 1.0) ** 1.1
    sizes = np.bincount(group_of, minlength=n_groups)
    cum = np.cumsum(weight) - np.repeat(np.cumsum(weight)[np.cumsum(sizes) - sizes] -
                                        weight[np.cumsum(sizes) - sizes], sizes)
    total = np.repeat(cum[np.cumsum(sizes) - 1], sizes)
    key = group_of[order] + cum / total  # in (g, g + 1]
    pick = np.searchsorted(key, group + rng.random(n) * (1 - 1e-12), side="left")
    items = order[np.minimum(pick, cfg.items - 1)]
    gaps = rng.integers(60, 86_400 * 30, size=n)
    start = np.repeat(1_300_000_000 + rng.integers(0, 10_000_000, size=cfg.users), lengths)
    times = start + np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[np.cumsum(lengths) - 1] -
                                                np.add.reduceat(gaps, np.cumsum(lengths) - lengths),
                                                lengths)
    users = [f"U{u:08d}" for u in range(cfg.users)]
    return RawData([users[u] for u in user.tolist()], [asin[i] for i in items.tolist()],
                   times.astype(np.float64), meta, None,
                   {"synthetic": f"users={cfg.users} items={cfg.items} seed={cfg.seed}"})


def write_amazon2014(raw: RawData, directory, category: str = "Synthetic") -> None:
    """Write `raw` as Amazon 2014 files: ratings CSV (user,item,rating,time) and metadata as
    Python-literal dicts, one per line (what McAuley's 2014 dumps look like). Each file is
    written whole or not at all (atomic_path), so an interrupted run leaves no half a file."""
    from pathlib import Path

    d = Path(directory)
    with atomic_path(d / f"ratings_{category}.csv") as tmp, open(tmp, "w") as f:
        for u, i, t in zip(raw.users, raw.items, raw.times.astype(np.int64).tolist()):
            f.write(f"{u},{i},5.0,{t}\n")
    rng = np.random.default_rng(0)
    asins = list(raw.meta)

    def related():  # real dumps list dozens of co-purchased items: most of each line's bytes
        pick = rng.integers(0, len(asins), size=rng.integers(20, 70)).tolist()
        return {"also_bought": [asins[j] for j in pick[:len(pick) // 2]],
                "also_viewed": [asins[j] for j in pick[len(pick) // 2:]],
                "bought_together": [asins[pick[0]]]}

    with atomic_path(d / f"meta_{category}.json") as tmp, open(tmp, "w") as f:
        for asin, rec in raw.meta.items():
            lit = {"asin": asin, "title": rec["title"], "description": rec["description"],
                   "price": rec.get("price"), "brand": rec["brand"],
                   "categories": [rec["categories"]],
                   "related": related(),
                   "salesRank": {category: 1}}
            f.write(repr(lit) + "\n")
