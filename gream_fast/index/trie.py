"""PrefixTrie: the exact set of item token sequences, for constrained decoding and rewards.

A thin Python face on the C++ trie (csrc/): arguments are checked and converted here, the work
runs in C++ without the GIL. Nodes are numbered breadth-first with each node's children sorted
by token, so node 0 is the root and the CSR edge e leads to node e + 1.
"""
import numpy as np

from gream_fast import _trie
from gream_fast.arrays import as_int_array, like
from gream_fast.errors import InvalidInputError
from gream_fast.files import load_arrays, save_arrays

_FORMAT, _VERSION = "gream-fast.prefix-trie", 1


class PrefixTrie:
    """Trie over item token sequences: row i of `seqs` ([N, Lmax] ints, -1 padding at the end)
    is item i. Rows must be distinct and non-empty."""

    def __init__(self, seqs):
        arr = as_int_array(seqs, "seqs", ndim=2)
        try:
            self._t = _trie.PrefixTrie(arr)
        except ValueError as e:
            raise InvalidInputError(f"PrefixTrie: seqs {e}") from None

    @property
    def num_items(self) -> int:
        return self._t.num_items

    @property
    def num_nodes(self) -> int:
        return self._t.num_nodes

    @property
    def max_depth(self) -> int:
        return self._t.max_depth

    def __len__(self) -> int:
        return self._t.num_items

    def __repr__(self) -> str:
        return (f"PrefixTrie(num_items={self.num_items}, num_nodes={self.num_nodes}, "
                f"max_depth={self.max_depth})")

    def memory_bytes(self) -> int:
        return self._t.memory_bytes()

    def allowed(self, prefix) -> np.ndarray:
        """Sorted tokens that may follow `prefix`; empty if the prefix leads nowhere, or is a
        complete item with no longer item below it."""
        return self._t.allowed(as_int_array(prefix, "prefix", ndim=1))

    def walk(self, nodes, tokens):
        """One batched step: the child of each node along its token, or -1 (a node of -1 stays
        -1). Same shape as `nodes`; returns a torch tensor if `nodes` was one."""
        n = as_int_array(nodes, "nodes", keep_int32=True)
        t = as_int_array(tokens, "tokens", keep_int32=True)
        if n.shape != t.shape:
            raise InvalidInputError(
                f"walk: nodes has shape {list(n.shape)} but tokens {list(t.shape)}")
        return like(self._call(self._t.walk, n, t), nodes)

    def item_of(self, nodes):
        """The item that ends at each node, or -1."""
        return like(self._call(self._t.item_of, as_int_array(nodes, "nodes", keep_int32=True)), nodes)

    def lookup(self, seqs):
        """[M, W] token rows -> the item each row spells exactly, or -1. A row is its tokens
        followed only by -1 padding; any other negative value, or a token after the padding,
        makes it no item."""
        return like(self._t.lookup(as_int_array(seqs, "seqs", ndim=2)), seqs)

    def common_prefix(self, seqs, items):
        """Per row: how many leading tokens of seqs[m] equal those of item items[m]."""
        s = as_int_array(seqs, "seqs", ndim=2)
        i = as_int_array(items, "items", ndim=1)
        return like(self._call(self._t.common_prefix, s, i), seqs)

    def sequences(self) -> np.ndarray:
        """The item token sequences [num_items, max_depth] (int32, -1 padding): the trie's input."""
        return self._t.sequences()

    def to_arrays(self) -> dict:
        """Flat int32 arrays for the GPU: CSR `indptr` [num_nodes + 1] over edges, `tokens` and
        `children` [num_nodes - 1] (children[e] == e + 1), `node_item`, `node_depth`, `parent`
        [num_nodes]."""
        return self._t.arrays()

    def save(self, path) -> None:
        """Write the item sequences (the most compact exact form) to a safetensors file."""
        save_arrays(path, {"sequences": self.sequences()}, _FORMAT, _VERSION)

    @classmethod
    def load(cls, path) -> "PrefixTrie":
        arrays, _ = load_arrays(path, _FORMAT, _VERSION, ["sequences"])
        try:
            return cls(arrays["sequences"])
        except InvalidInputError as e:
            raise InvalidInputError(f"{path}: {e}") from None

    @staticmethod
    def _call(fn, *args):
        try:
            return fn(*args)
        except (ValueError, IndexError) as e:
            raise InvalidInputError(str(e)) from None
