"""The item constraint on the device: the exact prefix trie of every item's SID tokens + EOS.

Appending EOS to every item makes "a complete item may only be followed by EOS" a property of
the trie itself: the node where an item's SID ends has one child, EOS, and the EOS node names
the item. Decoding carries one int32 node per row; a step is a gather (trie_topk).
"""
import numpy as np
import torch

from gream_fast.errors import FormatError, InvalidInputError
from gream_fast.files import load_arrays, save_arrays
from gream_fast.index.semantic_index import SemanticIndex
from gream_fast.index.tokens import is_contiguous, sid_token_table
from gream_fast.index.trie import PrefixTrie

_FORMAT, _VERSION = "gream-fast/sid-constraint", 1


class SIDConstraint:
    """Items' SID token ids + EOS as a PrefixTrie (host) and its flat arrays on `device`."""

    def __init__(self, index, tokenizer=None, *, eos_token_id: int | None = None,
                 token_table=None, device="cpu"):
        if token_table is None:
            if tokenizer is None:
                raise InvalidInputError("SIDConstraint: pass a tokenizer or a token_table")
            token_table = sid_token_table(tokenizer, index)
        if eos_token_id is None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
            if eos_token_id is None:
                raise InvalidInputError("SIDConstraint: the tokenizer has no eos_token_id; pass one")
        self.index = index
        self.eos_token_id = int(eos_token_id)
        self.token_table = np.asarray(token_table, dtype=np.int64)  # [L + 1, K]
        if (self.token_table == self.eos_token_id).any():
            raise InvalidInputError(f"eos_token_id {eos_token_id} is also a SID token")
        codes = index.sid_codes()
        levels = np.broadcast_to(np.arange(codes.shape[1]), codes.shape)
        ids = np.where(codes >= 0, self.token_table[levels, np.maximum(codes, 0)], -1)
        lens = (ids >= 0).sum(1)
        seqs = np.full((ids.shape[0], ids.shape[1] + 1), -1, dtype=np.int64)
        seqs[:, :-1] = ids
        seqs[np.arange(len(seqs)), lens] = self.eos_token_id
        self.trie = PrefixTrie(seqs)
        self.max_len = self.trie.max_depth  # SID tokens + EOS
        self.contiguous = is_contiguous(self.token_table)
        self.to(device)

    def to(self, device) -> "SIDConstraint":
        a = self.trie.to_arrays()
        self.device = torch.device(device)
        t = {k: torch.from_numpy(np.ascontiguousarray(a[k])).to(self.device)
             for k in ("indptr", "tokens", "node_item")}
        self.indptr, self.tokens = t["indptr"].int(), t["tokens"].int()
        self.node_item = t["node_item"].int()
        fan = np.diff(a["indptr"])
        self.max_children = int(fan.max())
        # nodes where a SID is complete: their only child is EOS
        first = np.where(fan > 0, a["tokens"][np.minimum(a["indptr"][:-1], len(a["tokens"]) - 1)], -1)
        self.ends = torch.from_numpy((fan == 1) & (first == self.eos_token_id)).to(self.device)
        return self

    def save(self, path, arrays: dict | None = None, **meta) -> None:
        """One safetensors file with everything needed to rebuild the constraint without a
        tokenizer (the index, the SID token ids, the end token): what a process that has only
        a path (a vLLM worker, a verl reward manager) loads. `arrays`: extra named numpy arrays
        stored beside (an adapter's tables; load(path, extra=True) reads them back); `meta`:
        extra string metadata."""
        own = {"codes": self.index.codes, "extra": self.index.extra,
               "token_table": self.token_table}
        clash = sorted(set(own) & set(arrays or {}))
        if clash:
            raise InvalidInputError(f"SIDConstraint.save: arrays {clash} are the constraint's own "
                                    "names; pick others")
        save_arrays(path, {**own, **(arrays or {})}, _FORMAT, _VERSION,
                    codebook_size=self.index.codebook_size, eos_token_id=self.eos_token_id, **meta)

    @classmethod
    def load(cls, path, device="cpu", *, extra: bool = False):
        """The constraint saved at `path`; with extra=True, (constraint, the extra arrays given
        to save, the file's string metadata)."""
        arrays, meta = load_arrays(path, _FORMAT, _VERSION, ["codes", "extra", "token_table"])
        try:
            index = SemanticIndex(arrays["codes"], arrays["extra"], int(meta["codebook_size"]))
            out = cls(index, token_table=arrays["token_table"],
                      eos_token_id=int(meta["eos_token_id"]), device=device)
        except (KeyError, ValueError) as e:
            raise FormatError(f"{path}: not a valid SID constraint ({e})") from None
        if not extra:
            return out
        rest = {k: v for k, v in arrays.items() if k not in ("codes", "extra", "token_table")}
        return out, rest, meta

    @property
    def num_items(self) -> int:
        return self.trie.num_items

    def level_rows(self, depth: int) -> slice:
        """LM-head rows of the SID tokens that may come at `depth` (0-based level): a slice,
        which needs the SID token ids to be contiguous."""
        if not self.contiguous:
            raise InvalidInputError("score='sid' needs contiguous SID token ids (add_sid_tokens "
                                    "to a tokenizer that had none gives them)")
        k = self.token_table.shape[1]
        start = int(self.token_table[0, 0]) + depth * k
        return slice(start, start + k)

    def items_of_nodes(self, nodes: torch.Tensor) -> torch.Tensor:
        """Item at each node (the EOS node of an item), -1 elsewhere or for -1."""
        return torch.where(nodes >= 0, self.node_item[nodes.clamp(min=0).long()], -1)
