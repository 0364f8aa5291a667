"""What the task builders need from a dataset and an index: SID strings, item texts, and the
category statistics the template teacher reasons with."""
from collections import Counter

import numpy as np

from gream_fast.data.dataset import Dataset
from gream_fast.errors import InvalidInputError
from gream_fast.index.semantic_index import SemanticIndex, load_index  # noqa: F401 (re-exported)

HISTORY_SEP = ", "


class TaskContext:
    """A dataset with its semantic index: item SIDs as text, titles, descriptions, and which
    categories say something (a label on most items, like the store's top category, does not)."""

    def __init__(self, data: Dataset, index: SemanticIndex | None = None):
        if index is not None and index.num_items != data.num_items:
            raise InvalidInputError(f"the index has {index.num_items} items but the dataset "
                                    f"{data.num_items}: they must describe the same items")
        self.data, self.index = data, index
        # SIDs as text; None without an index (teachers need only the item texts)
        self.sids = None if index is None else [
            "".join(index.sid(i)) for i in range(index.num_items)]
        self.titles = [it.get("title", "") for it in data.items]
        self.descriptions = [it.get("description", "") for it in data.items]
        counts = Counter(c for it in data.items for c in set(it.get("categories", [])))
        common = {c for c, n in counts.items() if n > 0.5 * data.num_items}
        self.categories = [[c for c in it.get("categories", []) if c not in common]
                           for it in data.items]
        self.brands = [it.get("brand", "") for it in data.items]

    def history_text(self, items) -> str:
        return HISTORY_SEP.join(self.sids[i] for i in items)

    def titles_text(self, items) -> str:
        return HISTORY_SEP.join(self.titles[i].rstrip(".") for i in items)

    def category_transitions(self) -> dict:
        """P(next category | category) counted over consecutive training items of all users."""
        counts: dict = {}
        for s in self.data.sequences:
            train = s["items"][:-2]
            for a, b in zip(train, train[1:]):
                for ca in self.categories[a]:
                    row = counts.setdefault(ca, Counter())
                    row.update(self.categories[b])
        return counts


def rng_for(seed: int, *salt) -> np.random.Generator:
    """A generator per (seed, purpose): tasks draw independently, so adding one task does not
    change the rows of another."""
    return np.random.default_rng([seed, *[hash_str(s) for s in salt]])


def hash_str(s) -> int:
    """A stable (not per-process salted) 32-bit hash of a short string or int."""
    h = 2166136261
    for ch in str(s).encode():
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    return h
