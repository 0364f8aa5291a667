"""The item constraint on the device: the exact prefix trie of every item's SID tokens + EOS.

Appending EOS to every item makes "a complete item may only be followed by EOS" a property of
the trie itself: the node where an item's SID ends has one child, EOS, and the EOS node names
the item. Decoding carries one int32 node per row; a step is a gather (trie_topk).
"""
import numpy as np
import torch

from gream_fast.errors import InvalidInputError
from gream_fast.index.tokens import is_contiguous, sid_token_table
from gream_fast.index.trie import PrefixTrie


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
