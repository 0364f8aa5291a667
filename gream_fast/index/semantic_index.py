"""SemanticIndex: item <-> semantic ID codes <-> token strings (METHOD.md section 2).

Codes are 0-based integers per level; the token string of code k at level l is `<|{letter}_{k+1}|>`
with letters a, b, c, ... (1-based, as in the released GREAM `.index.json` files). Items that share
all L cluster codes get one extra level whose code is their rank in that collision group (token
numbers 1, 2, ... in item order), so a SID has L or L + 1 tokens.

Stored as the reference's `X.index.json` or as safetensors; load_index reads either, or a folder
holding one, for every command, and fingerprint() names the item -> SID mapping a model learned.
"""
import hashlib
import json
import re
import string
from collections import Counter
from pathlib import Path

import numpy as np

from gream_fast.arrays import as_int_array
from gream_fast.errors import FormatError, InvalidInputError
from gream_fast.files import atomic_path, load_arrays, loads, save_arrays

_FORMAT, _VERSION = "gream-fast.semantic-index", 1
LEVEL_LETTERS = string.ascii_lowercase
# Codes per level at most: all (L + 1) x K SID strings become tokenizer tokens, so a K inferred
# from a stray `<|a_999999999|>` must be refused, not allocated.
MAX_CODEBOOK_SIZE = 65536
_TOKEN = re.compile(r"<\|([a-z])_([0-9]+)\|>\Z")  # ASCII digits: \d would take any script's


def _check_codebook_size(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_CODEBOOK_SIZE:
        raise InvalidInputError(f"codebook_size {k!r}: expected an integer in 1..{MAX_CODEBOOK_SIZE} "
                                "(codes per level)")
    return int(k)


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
        codebook_size = _check_codebook_size(codebook_size)
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
        shared = counts[group] > 1
        bad = np.flatnonzero(shared != (extra >= 0))  # a collision level exactly where codes are shared
        if len(bad):
            i = bad[0]
            toks = [sid_token(l, c) for l, c in enumerate(codes[i])]
            if not shared[i]:  # else the L codes could not be read back from an .index.json
                raise InvalidInputError(f"item {i} has a collision level but no other item shares "
                                        f"its codes {toks}: its SID should be those {levels} alone")
            other = np.flatnonzero(group == group[i])
            other = other[other != i][0]
            raise InvalidInputError(f"items {i} and {other} share the codes {toks} but item {i} has "
                                    "no collision level: its SID would be a prefix of the other's")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes, codebook_size: int | None = None) -> "SemanticIndex":
        """Index from clustering codes [N, L]; adds the collision level. codebook_size defaults to
        the largest code + 1."""
        codes = as_int_array(codes, "codes", ndim=2)
        if codes.size == 0:
            raise InvalidInputError(f"codes: expected [items, levels] with both > 0, got {list(codes.shape)}")
        k = _check_codebook_size(int(codes.max()) + 1 if codebook_size is None else codebook_size)
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
        """Read an `X.index.json`: {"0": ["<|a_12|>", ...], ...}, items numbered 0..N-1, level
        letters a, b, c, ... in order, codes 1..K. L is the SID length that explains the file
        (L + 1 tokens: a collision level); codebook_size defaults to the largest code seen."""
        path = Path(path)
        limit = MAX_CODEBOOK_SIZE if codebook_size is None else _check_codebook_size(codebook_size)
        why = (", the most codes a level may have" if codebook_size is None
               else ", the codebook_size given")
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except OSError as e:
            raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise FormatError(f"{path}: not UTF-8 text (byte {e.start}); expected an X.index.json "
                              "file") from None
        data = loads(text, str(path))  # DataError: bad JSON, NaN, nested too deeply
        if not isinstance(data, dict) or not data:
            raise FormatError(f"{path}: expected a non-empty object {{item id: [tokens]}}")
        n = len(data)
        # a dict keeps only the last of a repeated id: read the file's keys as written
        keys = [k for k, _ in json.loads(text, object_pairs_hook=list)]
        if len(keys) > n:
            dup = next(k for k, c in Counter(keys).items() if c > 1)
            raise FormatError(f"{path}: item id {dup!r} appears {keys.count(dup)} times; expected "
                              "one entry per item")
        ids = {str(i): i for i in range(n)}  # the one spelling of each id: no "01", "+1", "²"
        rows: list = [None] * n
        parsed: dict = {}  # token -> (level, code): a file repeats its (L + 1) x K tokens
        for key, toks in data.items():
            if key not in ids:
                missing = next(i for i in range(n) if str(i) not in data)
                raise FormatError(f"{path}: item id {key!r}: expected ids 0..{n - 1}, one per item "
                                  f"(item \"{missing}\" is missing)")
            at = f"{path}: item \"{key}\""
            if not isinstance(toks, list) or not 0 < len(toks) < len(LEVEL_LETTERS):
                raise FormatError(f"{at}: expected a list of 1 to {len(LEVEL_LETTERS) - 1} tokens, "
                                  f"got {_short(toks)}")
            row = []
            for j, tok in enumerate(toks):
                got = parsed.get(tok) if isinstance(tok, str) else None
                if got is None or got[0] != j:
                    got = parsed[tok] = _parse_token(tok, j, limit, f"{at}, token {j}", why)
                row.append(got[1])
            rows[ids[key]] = row
        codes, extra = _split_levels(rows, path)
        k = max(int(codes.max()), int(extra.max())) + 1 if codebook_size is None else limit
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
        k = meta.get("codebook_size")
        if k is None or not (k.isascii() and k.isdigit()) or len(k) > 9:
            raise FormatError(f"{path}: metadata 'codebook_size' is {'missing' if k is None else _short(k)}"
                              f"; expected an integer in 1..{MAX_CODEBOOK_SIZE} (codes per level)")
        try:
            return cls(arrays["codes"], arrays["extra"], int(k))
        except InvalidInputError as e:
            raise FormatError(f"{path}: {e}") from None

    def fingerprint(self) -> str:
        """16 hex digits naming the item -> SID mapping (codebook size and each item's SID codes):
        the same for one index read from .index.json or .safetensors, different for any other
        (permuted, subset, another K). A trained model records it to check its index."""
        sids = self.sid_codes()
        h = hashlib.sha256(f"{_FORMAT}:{self.codebook_size}:{sids.shape}".encode())
        h.update(np.ascontiguousarray(sids, dtype="<i8").tobytes())
        return h.hexdigest()[:16]

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


def _short(value) -> str:
    """A JSON value as a message quotes it, cut to 40 characters."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_token(tok, level: int, limit: int, at: str, why: str) -> tuple[int, int]:
    """(level, 0-based code) of the SID token `tok` that must be at `level`."""
    want = f"'<|{LEVEL_LETTERS[level]}_N|>'"
    m = _TOKEN.match(tok) if isinstance(tok, str) else None
    if m is None or m.group(1) != LEVEL_LETTERS[level]:
        raise FormatError(f"{at}: {_short(tok)} is not {want} (levels are lettered a, b, c, ... "
                          "in order)")
    num = m.group(2)
    if num[0] == "0" or len(num) > 6 or int(num) > limit:  # "012" would not write back the same
        raise FormatError(f"{at}: {_short(tok)}: expected {want} with N in 1..{limit}{why}")
    return level, int(num) - 1


def _split_levels(rows: list, path) -> tuple[np.ndarray, np.ndarray]:
    """codes [N, L] and extra [N] from SIDs of L or L + 1 codes. L is the length that leaves the
    fewest items unexplained: shorter, longer than L + 1, or L + 1 codes whose first L no other
    item shares (a collision level is only for shared codes; SemanticIndex refuses the rest). So
    one truncated SID among L + 1-token ones is blamed on that item, not read as L with every
    other item collided."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    padded = np.full((len(rows), lengths.max()), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    best = None
    for L in np.unique(lengths).tolist():
        ext = np.flatnonzero(lengths == L + 1)
        lonely = 0
        if len(ext):
            group, counts = _group_rows(padded[ext, :L])
            lonely = int((counts[group] == 1).sum())
        cost = int(((lengths < L) | (lengths > L + 1)).sum()) + lonely
        if best is None or cost < best[0]:
            best = cost, L
    L = best[1]
    bad = np.flatnonzero((lengths < L) | (lengths > L + 1))
    if len(bad):
        i = int(bad[0])
        raise FormatError(f"{path}: item \"{i}\" has {lengths[i]} tokens; expected {L} as the other "
                          f"items have ({L + 1} with a collision level, where items share {L} codes)")
    return padded[:, :L], (padded[:, L] if padded.shape[1] > L else np.full(len(rows), -1))


def load_index(path, codebook_size: int | None = None) -> SemanticIndex:
    """The SemanticIndex at `path`, for every command: a folder holding index.safetensors or
    exactly one *.index.json (what `index build` writes), an X.index.json file, or an index
    .safetensors file. codebook_size: K of an .index.json (default: its largest code); a
    .safetensors index records its own, which must then agree."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.index.json"))
        if (p / "index.safetensors").is_file():
            p = p / "index.safetensors"
        elif len(found) == 1:
            p = found[0]
        else:
            names = ", ".join(f.name for f in found[:4]) + " ..." * (len(found) > 4)
            raise FormatError(f"{p}: a folder with no index.safetensors and {len(found) or 'no'} "
                              f"*.index.json files{f' ({names})' if found else ''}; expected "
                              "index.safetensors or exactly one X.index.json (or pass the file)")
    elif not p.exists():
        raise FormatError(f"{p}: no such file or folder; expected an index folder, an X.index.json "
                          "or an index .safetensors file")
    if p.name.endswith(".json"):
        return SemanticIndex.from_index_json(p, codebook_size)
    try:
        index = SemanticIndex.load(p)
    except FormatError as e:
        if p.suffix == ".safetensors":
            raise
        raise FormatError(f"{e}; expected an index folder, an X.index.json or an index "
                          ".safetensors file") from None
    if codebook_size is not None and codebook_size != index.codebook_size:
        raise InvalidInputError(f"{p}: codebook_size {codebook_size} given, but this index records "
                                f"{index.codebook_size} (the option is for .index.json files)")
    return index
