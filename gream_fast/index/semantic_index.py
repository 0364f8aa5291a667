"""SemanticIndex: item <-> semantic ID codes <-> token strings (METHOD.md section 2).

Codes are 0-based integers per level; the token string of code k at level l is `<|{letter}_{k+1}|>`
with letters a, b, c, ... (1-based, as in the released GREAM `.index.json` files). Items that share
all L cluster codes get one extra level whose code is their rank in that collision group (token
numbers 1, 2, ... in item order), so a SID has L or L + 1 tokens.
"""
import json
import re
import string
from pathlib import Path

import numpy as np

from gream_fast.arrays import as_int_array
from gream_fast.errors import FormatError, InvalidInputError
from gream_fast.files import atomic_path, load_arrays, save_arrays

_FORMAT, _VERSION = "gream-fast.semantic-index", 1
LEVEL_LETTERS = string.ascii_lowercase
_TOKEN = re.compile(r"<\|([a-z])_(\d+)\|>\Z")


def sid_token(level: int, code: int) -> str:
    """Token string of 0-based `code` at 0-based `level`."""
    return f"<|{LEVEL_LETTERS[level]}_{code + 1}|>"


class SemanticIndex:
    """codes [N, L] (0-based cluster codes), extra [N] (collision-level code, -1 for items whose
    L codes are unique), codebook_size K. Build it with from_codes or read one from a file."""

    def __init__(self, codes, extra, codebook_size: int):
        codes = as_int_array(codes, "codes", ndim=2)
        extra = as_int_array(extra, "extra", ndim=1)
        n, levels = codes.shape
        if n == 0 or levels == 0:
            raise InvalidInputError(f"codes: expected [items, levels] with both > 0, got {[n, levels]}")
        if levels + 1 > len(LEVEL_LETTERS):
            raise InvalidInputError(f"codes: at most {len(LEVEL_LETTERS) - 1} levels, got {levels}")
        if extra.shape != (n,):
            raise InvalidInputError(f"extra: expected shape [{n}], got {list(extra.shape)}")
        if codebook_size < 1:
            raise InvalidInputError(f"codebook_size: expected a positive integer, got {codebook_size}")
        bad = np.argwhere((codes < 0) | (codes >= codebook_size))
        if len(bad):
            i, l = bad[0]
            raise InvalidInputError(
                f"codes[{i}, {l}] = {codes[i, l]}: expected 0..{codebook_size - 1}")
        bad = np.flatnonzero((extra < -1) | (extra >= codebook_size))
        if len(bad):
            raise InvalidInputError(
                f"extra[{bad[0]}] = {extra[bad[0]]}: expected -1 or 0..{codebook_size - 1}")
        self.codes, self.extra, self.codebook_size = codes, extra, int(codebook_size)
        sids = self.sid_codes()
        group, counts = _group_rows(sids + 1)  # +1: the -1 padding becomes a code of its own
        if counts.max() > 1:
            items = np.flatnonzero(group == np.argmax(counts))
            raise InvalidInputError(
                f"items {items[0]} and {items[1]} have the same SID "
                f"{[sid_token(l, c) for l, c in enumerate(sids[items[0]].tolist()) if c >= 0]}")
        group, counts = _group_rows(codes)
        bare = np.flatnonzero((counts[group] > 1) & (extra < 0))
        if len(bare):
            i = bare[0]
            other = np.flatnonzero(group == group[i])
            other = other[other != i][0]
            raise InvalidInputError(
                f"items {i} and {other} share the codes {codes[i].tolist()} but item {i} has no "
                "collision level: its SID would be a prefix of the other's")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes, codebook_size: int | None = None) -> "SemanticIndex":
        """Index from clustering codes [N, L]; adds the collision level. codebook_size defaults to
        the largest code + 1."""
        codes = as_int_array(codes, "codes", ndim=2)
        if codes.size == 0:
            raise InvalidInputError(f"codes: expected [items, levels] with both > 0, got {list(codes.shape)}")
        k = int(codes.max()) + 1 if codebook_size is None else int(codebook_size)
        group, counts = _group_rows(codes)
        order = np.argsort(group, kind="stable")  # item order within each group
        first = np.cumsum(counts) - counts
        rank = np.empty(len(codes), dtype=np.int64)
        rank[order] = np.arange(len(codes)) - first[group[order]]
        extra = np.where(counts[group] > 1, rank, -1)
        if counts.max() > k:
            g = int(np.argmax(counts))
            items = np.flatnonzero(group == g)
            raise InvalidInputError(
                f"codes: {counts[g]} items share the codes {codes[items[0]].tolist()} (items "
                f"{items[:8].tolist()}{' ...' if len(items) > 8 else ''}), more than the codebook "
                f"size {k} that the collision level can tell apart")
        return cls(codes, extra, k)

    # -- views ----------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return self.codes.shape[0]

    @property
    def num_levels(self) -> int:
        """L, the clustering levels (a SID may carry one more, the collision level)."""
        return self.codes.shape[1]

    @property
    def num_collisions(self) -> int:
        """Items that needed the collision level."""
        return int((self.extra >= 0).sum())

    @property
    def max_len(self) -> int:
        return self.num_levels + int(self.num_collisions > 0)

    def __len__(self) -> int:
        return self.num_items

    def __repr__(self) -> str:
        return (f"SemanticIndex(num_items={self.num_items}, num_levels={self.num_levels}, "
                f"codebook_size={self.codebook_size}, num_collisions={self.num_collisions})")

    def sid_codes(self) -> np.ndarray:
        """[N, max_len] 0-based codes per level, -1 where an item has no collision level."""
        out = self.codes
        if self.max_len > self.num_levels:
            out = np.concatenate([out, self.extra[:, None]], axis=1)
        return out

    def sid(self, item: int) -> list[str]:
        """Token strings of one item's SID."""
        if not 0 <= item < self.num_items:
            raise InvalidInputError(f"item {item}: expected 0..{self.num_items - 1}")
        return [sid_token(l, int(c)) for l, c in enumerate(self.sid_codes()[item]) if c >= 0]

    def token_strings(self) -> list[str]:
        """Every token string of the vocabulary: (L + 1) levels x K codes, level-major."""
        return [sid_token(l, c) for l in range(self.num_levels + 1) for c in range(self.codebook_size)]

    def token_ids(self, tokenizer) -> np.ndarray:
        """[N, max_len] token ids of each item's SID (-1 padding): what the PrefixTrie is built from."""
        from gream_fast.index.tokens import sid_token_table

        table = sid_token_table(tokenizer, self)  # [L + 1, K]
        codes = self.sid_codes()
        levels = np.broadcast_to(np.arange(codes.shape[1]), codes.shape)
        return np.where(codes >= 0, table[levels, np.maximum(codes, 0)], -1)

    # -- files ----------------------------------------------------------------------------------
    def to_index_json(self, path) -> None:
        """Write the reference's `X.index.json`: {"0": ["<|a_12|>", ...], ...}, one item a line."""
        codes = self.sid_codes()
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.write("{\n")
            for i, row in enumerate(codes):
                toks = ", ".join(f'"{sid_token(l, c)}"' for l, c in enumerate(row.tolist()) if c >= 0)
                f.write(f'  "{i}": [{toks}]{"," if i + 1 < len(codes) else ""}\n')
            f.write("}\n")

    @classmethod
    def from_index_json(cls, path, codebook_size: int | None = None) -> "SemanticIndex":
        """Read an `X.index.json`. L is the shortest SID's length; longer SIDs (L + 1 tokens)
        carry the collision level. codebook_size defaults to the largest code seen."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or not data:
            raise FormatError(f"{path}: expected a non-empty object {{item id: [tokens]}}")
        n = len(data)
        rows: list = [None] * n
        for key, toks in data.items():
            if not (key.isascii() and key.isdigit() and int(key) < n and str(int(key)) == key):
                raise FormatError(f"{path}: key {key!r}: expected item ids 0..{n - 1}")
            if not isinstance(toks, list) or not 0 < len(toks) < len(LEVEL_LETTERS):
                raise FormatError(f"{path}: item \"{key}\": expected a list of 1 to "
                                  f"{len(LEVEL_LETTERS) - 1} tokens")
            row = []
            for j, tok in enumerate(toks):
                m = _TOKEN.match(tok) if isinstance(tok, str) else None
                if (m is None or m.group(1) != LEVEL_LETTERS[j] or len(m.group(2)) > 9
                        or int(m.group(2)) < 1):
                    raise FormatError(
                        f"{path}: item \"{key}\", token {j}: {tok!r} is not "
                        f"'<|{LEVEL_LETTERS[j]}_N|>' with 1 <= N < 10^9")
                row.append(int(m.group(2)) - 1)
            rows[int(key)] = row
        levels = min(len(r) for r in rows)
        for i, r in enumerate(rows):
            if len(r) > levels + 1:
                raise FormatError(
                    f"{path}: item \"{i}\" has {len(r)} tokens; expected {levels} or {levels + 1} "
                    f"(the shortest SID has {levels})")
        codes = np.array([r[:levels] for r in rows], dtype=np.int64)
        extra = np.array([r[levels] if len(r) > levels else -1 for r in rows], dtype=np.int64)
        k = max(int(codes.max()), int(extra.max())) + 1 if codebook_size is None else codebook_size
        try:
            return cls(codes, extra, k)
        except InvalidInputError as e:
            raise FormatError(f"{path}: {e}") from None

    def save(self, path) -> None:
        save_arrays(path, {"codes": self.codes, "extra": self.extra}, _FORMAT, _VERSION,
                    codebook_size=self.codebook_size)

    @classmethod
    def load(cls, path) -> "SemanticIndex":
        arrays, meta = load_arrays(path, _FORMAT, _VERSION, ["codes", "extra"])
        try:
            return cls(arrays["codes"], arrays["extra"], int(meta["codebook_size"]))
        except (KeyError, ValueError) as e:
            raise FormatError(f"{path}: {e}") from None

    def __eq__(self, other) -> bool:
        return (isinstance(other, SemanticIndex) and self.codebook_size == other.codebook_size
                and np.array_equal(self.codes, other.codes) and np.array_equal(self.extra, other.extra))


def _group_rows(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group id of each row (equal rows share one) and the size of each group."""
    k = int(codes.max()) + 1
    if k ** codes.shape[1] < 2 ** 62:  # pack each row into one int64 key: a 1-D unique is faster
        key = np.zeros(len(codes), dtype=np.int64)
        for col in codes.T:
            key = key * k + col
        _, group, counts = np.unique(key, return_inverse=True, return_counts=True)
    else:
        _, group, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return group.reshape(-1), counts
