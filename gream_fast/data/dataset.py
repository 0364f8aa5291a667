"""A prepared dataset folder (`gream-fast data prepare` output) and its leave-one-out split."""
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from gream_fast.errors import DataError, InvalidInputError
from gream_fast.files import loads, read_jsonl


@dataclass
class Examples:
    """Next-item examples: user [E], target [E], history [E, H] (item ids, oldest first, -1
    padding at the end) and history_len [E]."""

    user: np.ndarray
    target: np.ndarray
    history: np.ndarray
    history_len: np.ndarray

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, e: int) -> tuple[int, list, int]:
        """(user, history item ids, target) of example e."""
        return (int(self.user[e]), self.history[e, : self.history_len[e]].tolist(),
                int(self.target[e]))

    def __iter__(self):
        return (self[e] for e in range(len(self)))


@dataclass
class Split:
    train: Examples
    valid: Examples
    test: Examples


@numba.njit(cache=True)
def _windows(offsets, items, starts, ends, max_history):
    """One example per (user, position): for positions t in [starts[u], ends[u]) of user u, the
    target items[offsets[u] + t] and up to max_history items before it."""
    n = 0
    for u in range(starts.size):
        n += max(ends[u] - starts[u], 0)
    user = np.empty(n, np.int64)
    target = np.empty(n, np.int64)
    history = np.full((n, max_history), -1, np.int64)
    length = np.empty(n, np.int64)
    e = 0
    for u in range(starts.size):
        base = offsets[u]
        for t in range(starts[u], ends[u]):
            lo = max(0, t - max_history)
            user[e] = u
            target[e] = items[base + t]
            length[e] = t - lo
            for j in range(lo, t):
                history[e, j - lo] = items[base + j]
            e += 1
    return user, target, history, length


def _history_ok(h) -> bool:
    return isinstance(h, (int, np.integer)) and not isinstance(h, bool) and h >= 1


def _read_stats(path) -> dict:
    """stats.json (optional) as a dict; its max_history, when present, an integer >= 1."""
    if not path.exists():
        return {}
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; expected JSON") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    stats = loads(text, str(path))
    if not isinstance(stats, dict):
        raise DataError(f"{path}: expected a JSON object")
    h = stats.get("max_history", 20)
    if not _history_ok(h):
        raise DataError(f"{path}: field 'max_history': expected an integer >= 1, got {h!r}")
    return stats


class Dataset:
    """items: list of item records (id, raw_id, title, description, categories, brand[, price]);
    sequences: per user {"user", "user_id", "items", "times"} in time order."""

    def __init__(self, items: list, sequences: list, stats: dict | None = None, path=None):
        self.items, self.sequences, self.stats, self.path = items, sequences, stats or {}, path
        self.offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum([len(s["items"]) for s in sequences], out=self.offsets[1:])
        self.flat_items = np.fromiter((i for s in sequences for i in s["items"]), dtype=np.int64,
                                      count=int(self.offsets[-1]))

    @classmethod
    def load(cls, directory) -> "Dataset":
        d = Path(directory)
        for name in ("items.jsonl", "sequences.jsonl"):
            if not (d / name).is_file():
                raise InvalidInputError(f"{d}: no {name} (is this a `gream-fast data prepare` folder?)")
        items = read_jsonl(d / "items.jsonl")  # DataError naming file:line for broken JSON
        sequences = read_jsonl(d / "sequences.jsonl")
        stats = _read_stats(d / "stats.json")
        for name, rows in (("items.jsonl", items), ("sequences.jsonl", sequences)):
            for n, rec in enumerate(rows, 1):
                if not isinstance(rec, dict):
                    raise DataError(f"{d / name}:{n}: expected a JSON object")
        for n, rec in enumerate(items, 1):
            if rec.get("id") != n - 1:
                raise DataError(f"{d / 'items.jsonl'}:{n}: expected id {n - 1}, got {rec.get('id')!r}")
        for n, s in enumerate(sequences, 1):
            if s.get("user_id") != n - 1 or not isinstance(s.get("items"), list):
                raise DataError(f"{d / 'sequences.jsonl'}:{n}: expected user_id {n - 1} and an "
                                "items list")
            bad = [i for i in s["items"] if not (type(i) is int and 0 <= i < len(items))]
            if bad:
                raise DataError(f"{d / 'sequences.jsonl'}:{n}: item id {bad[0]!r} is not in "
                                f"items.jsonl (0..{len(items) - 1})")
        return cls(items, sequences, stats, d)

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_items(self) -> int:
        return len(self.items)

    def reviews(self) -> list:
        """Training-interaction reviews, when the source had them."""
        path = self.path and Path(self.path) / "reviews.jsonl"
        return read_jsonl(path) if path and path.exists() else []

    def train_sequence(self, user: int) -> list:
        """The user's training items: the sequence without its last two (valid, test)."""
        return self.sequences[user]["items"][:-2]

    def _history(self, max_history: int | None) -> int:
        """max_history, or the dataset's (stats.json, checked by load; default 20)."""
        h = self.stats.get("max_history", 20) if max_history is None else max_history
        if not _history_ok(h):
            raise InvalidInputError(f"max_history: expected an integer >= 1, got {h!r}")
        # a history is never longer than the longest sequence: no wider buffer than that
        return int(min(h, max(int(np.diff(self.offsets).max(initial=0)), 1)))

    def examples(self, first: int = 1, last_offset: int = 2, max_history: int | None = None,
                 last: int = 0) -> Examples:
        """Examples at positions first .. len - last_offset - 1 of every user's sequence; with
        last > 0 only each user's last `last` of them (every user at most `last`)."""
        h = self._history(max_history)
        lens = np.diff(self.offsets)
        ends = lens - last_offset
        starts = np.full(len(lens), first, dtype=np.int64)
        if last > 0:
            starts = np.maximum(starts, ends - last)
        return Examples(*_windows(self.offsets, self.flat_items, starts, ends, h))

    def split(self, max_history: int | None = None) -> Split:
        """Leave-one-out: train targets are every position of seq[:-2] after the first; valid
        predicts seq[-2] from what precedes it, test seq[-1]; histories keep the last
        max_history items (default: the dataset's, 20)."""
        h = self._history(max_history)
        lens = np.diff(self.offsets)
        if (lens < 3).any():
            u = int(np.argmax(lens < 3))
            raise InvalidInputError(f"user {u} has {lens[u]} items; leave-one-out needs at least 3")
        one = np.ones(len(lens), dtype=np.int64)
        train = _windows(self.offsets, self.flat_items, one, lens - 2, h)
        valid = _windows(self.offsets, self.flat_items, lens - 2, lens - 1, h)
        test = _windows(self.offsets, self.flat_items, lens - 1, lens, h)
        return Split(Examples(*train), Examples(*valid), Examples(*test))

