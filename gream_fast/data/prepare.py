"""Raw interactions -> clean, k-cored, chronological sequences (METHOD.md section 1).

The rules, in order: sort each user's interactions by time (ties keep file order), drop repeated
(user, item) pairs keeping the earliest, drop items without metadata (no record or no title),
iterate the k-core until stable, number users and items by their sorted raw ids.
"""
import json
import time
from dataclasses import asdict, dataclass, field

import numba
import numpy as np

from gream_fast.config import check_ranges
from gream_fast.data.readers import BadLines, RawData, check_args, read
from gream_fast.errors import InvalidInputError
from gream_fast.files import atomic_dir, check_output, write_jsonl

COMMAND = "data prepare"  # recorded in the output folder's marker (files.check_output)


@dataclass
class PrepareConfig:
    format: str = "recbole"
    input: str | None = None  # None with format recbole: the built-in MovieLens-100K
    category: str | None = None
    k_core: int = 5
    max_history: int = 20
    skip_bad_lines: bool = False
    out: str = "data/ml-100k"  # the CLI requires it

    def check(self) -> None:
        """Refuse bad flags before anything is read or written, naming the flag."""
        check_ranges(self, at_least={"k_core": 1, "max_history": 1})
        check_args(self.format, self.input, self.category)
        if not self.out:
            raise InvalidInputError("--out: expected a folder path")


@dataclass
class Prepared:
    """Clean sequences in memory: what `write` puts on disk."""

    user_raw: list  # raw id per user id
    item_raw: list  # raw id per item id
    items: list  # metadata record per item id
    offsets: np.ndarray  # [num_users + 1] into the flat arrays below
    seq_items: np.ndarray  # item ids, users one after another, each in time order
    seq_times: np.ndarray
    stats: dict = field(default_factory=dict)


def _factorize(values: list) -> tuple[np.ndarray, list]:
    """Codes (int64) and the distinct values in first-seen order: hashing at C speed
    (dict.fromkeys, map), no sorting of millions of Python strings."""
    distinct = list(dict.fromkeys(values))
    index = {v: i for i, v in enumerate(distinct)}
    codes = np.fromiter(map(index.__getitem__, values), dtype=np.int64, count=len(values))
    return codes, distinct


@numba.njit(cache=True)
def _k_core(users, items, alive, num_users, num_items, k):
    """Drop interactions of users or items with fewer than k alive interactions, repeatedly,
    until none changes. Returns the number of rounds."""
    rounds = 0
    while True:
        rounds += 1
        du = np.zeros(num_users, np.int64)
        di = np.zeros(num_items, np.int64)
        for e in range(users.size):
            if alive[e]:
                du[users[e]] += 1
                di[items[e]] += 1
        changed = False
        for e in range(users.size):
            if alive[e] and (du[users[e]] < k or di[items[e]] < k):
                alive[e] = False
                changed = True
        if not changed:
            return rounds


def _rank_by_raw_id(codes: np.ndarray, names: list) -> tuple[np.ndarray, list]:
    """Renumber the codes in use so that ids follow the sorted raw ids; returns (new code per
    old code or -1, raw ids in new-id order)."""
    used = np.unique(codes)
    raw = sorted(names[c] for c in used)
    position = {r: i for i, r in enumerate(raw)}
    remap = np.full(len(names), -1, dtype=np.int64)
    remap[used] = [position[names[c]] for c in used]
    return remap, raw


def prepare(raw: RawData, k_core: int = 5) -> Prepared:
    if k_core < 1:
        raise InvalidInputError(f"--k-core: expected >= 1, got {k_core}")
    n0 = len(raw.users)
    if n0 == 0:
        raise InvalidInputError(f"{raw.files.get('interactions')}: no interactions")
    users, user_names = _factorize(raw.users)
    items, item_names = _factorize(raw.items)
    times = raw.times

    # 1. per user, time order; lexsort is stable, so file order breaks ties
    order = np.lexsort((times, users))
    users, items, times = users[order], items[order], times[order]
    # 2. earliest of each repeated (user, item) pair
    key = users * len(item_names) + items
    _, first = np.unique(key, return_index=True)
    keep = np.zeros(len(key), bool)
    keep[first] = True
    dropped_dup = int(len(key) - keep.sum())
    # 3. items with metadata (a record with a title)
    has_meta = np.array([bool(raw.meta.get(name, {}).get("title")) for name in item_names])
    no_meta = keep & ~has_meta[items]
    dropped_meta = int(no_meta.sum())
    keep &= has_meta[items]
    # 4. iterative k-core
    before = int(keep.sum())
    rounds = _k_core(users, items, keep, len(user_names), len(item_names), k_core)
    dropped_core = before - int(keep.sum())
    users, items, times = users[keep], items[keep], times[keep]
    if len(users) == 0:
        raise InvalidInputError(
            f"no interactions left after the {k_core}-core filter ({n0} read, {dropped_dup} "
            f"repeated, {dropped_meta} without metadata, {dropped_core} below the core): lower "
            "--k-core or check the input")
    # 5. ids by sorted raw ids
    user_map, user_raw = _rank_by_raw_id(users, user_names)
    item_map, item_raw = _rank_by_raw_id(items, item_names)
    users, items = user_map[users], item_map[items]
    order = np.lexsort((np.arange(len(users)), users))  # regroup by new user id, keep time order
    users, items, times = users[order], items[order], times[order]
    offsets = np.zeros(len(user_raw) + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=len(user_raw)), out=offsets[1:])

    records = []
    for i, name in enumerate(item_raw):
        rec = {"id": i, "raw_id": name, **raw.meta[name]}
        records.append(rec)
    num_u, num_i, num_e = len(user_raw), len(item_raw), len(users)
    stats = {
        "num_users": num_u, "num_items": num_i, "num_interactions": num_e,
        "sparsity": 1.0 - num_e / (num_u * num_i), "k_core": k_core, "k_core_rounds": int(rounds),
        "read": n0, "dropped": {"repeated_pairs": dropped_dup, "no_metadata": dropped_meta,
                                "k_core": dropped_core},
        "files": raw.files,
    }
    return Prepared(user_raw, item_raw, records, offsets, items, times, stats)


def write(p: Prepared, out, raw: RawData | None = None, config: PrepareConfig | None = None) -> None:
    """Write the dataset folder atomically: all files appear together or not at all. `out` may
    be new, empty or an earlier output of this command; anything else is refused (OutputError)."""
    check_output(out, command=COMMAND, inputs=[config.input] if config else ())
    with atomic_dir(out, command=COMMAND) as d:
        write_jsonl(d / "items.jsonl", p.items)
        write_jsonl(d / "sequences.jsonl", (
            {"user": p.user_raw[u], "user_id": u,
             "items": p.seq_items[p.offsets[u]:p.offsets[u + 1]].tolist(),
             "times": _times(p.seq_times[p.offsets[u]:p.offsets[u + 1]])}
            for u in range(len(p.user_raw))))
        (d / "user_ids.json").write_text(json.dumps(p.user_raw, ensure_ascii=False), "utf-8")
        (d / "item_ids.json").write_text(json.dumps(p.item_raw, ensure_ascii=False), "utf-8")
        if raw is not None and raw.reviews is not None:
            p.stats["num_reviews"] = _write_reviews(p, raw, d / "reviews.jsonl")
        if config is not None:
            p.stats["max_history"] = config.max_history
            (d / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        (d / "stats.json").write_text(json.dumps(p.stats, indent=2, allow_nan=False) + "\n")


def _times(t: np.ndarray) -> list:
    """Unix times as ints when they are whole (they are, for every supported format)."""
    return t.astype(np.int64).tolist() if np.all(t == np.floor(t)) else t.tolist()


def _write_reviews(p: Prepared, raw: RawData, path) -> int:
    """Reviews of training interactions only (never the valid/test items: seq[:-2])."""
    user_id = {r: i for i, r in enumerate(p.user_raw)}
    item_id = {r: i for i, r in enumerate(p.item_raw)}
    train = set()
    for u in range(len(p.user_raw)):
        for i in p.seq_items[p.offsets[u]:p.offsets[u + 1] - 2].tolist():
            train.add((u, i))
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for u_raw, i_raw, text, summary, t in raw.reviews():
            u, i = user_id.get(u_raw), item_id.get(i_raw)
            if u is None or i is None or (u, i) not in train:
                continue
            train.discard((u, i))  # the earliest review of a pair, like the interaction kept
            row = {"user_id": u, "item_id": i, "text": text, "summary": summary, "time": int(t)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def run(config: PrepareConfig) -> Prepared:
    """`gream-fast data prepare`: check the flags and the output path, read, clean, write.
    Returns what was written; its stats count, per file, skipped bad lines ("bad_lines"), lines
    with invalid UTF-8 replaced by U+FFFD ("invalid_utf8_lines") and ignored duplicate item
    records ("duplicate_items")."""
    t0 = time.perf_counter()
    config.check()
    check_output(config.out, command=COMMAND, inputs=[config.input])
    bad = BadLines(skip=config.skip_bad_lines)
    raw = read(config.format, config.input, config.category, bad)
    p = prepare(raw, config.k_core)
    # the same dicts: a reviews file first read by write() still adds to them
    p.stats.update(bad_lines=bad.counts, invalid_utf8_lines=bad.replaced,
                   duplicate_items=bad.duplicates)
    p.stats["seconds"] = round(time.perf_counter() - t0, 3)
    write(p, config.out, raw, config)
    return p
