"""PrefixTrie against a plain Python model (a dict from each prefix tuple to its next tokens)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gream_fast import GreamError
from gream_fast.index import PrefixTrie


def pad(rows, width=None):
    width = width or max(len(r) for r in rows)
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


class Model:
    """The obvious trie: prefix tuple -> set of next tokens, full tuple -> item."""

    def __init__(self, rows):
        self.next, self.item = {}, {}
        for i, r in enumerate(rows):
            for d in range(len(r)):
                self.next.setdefault(tuple(r[:d]), set()).add(r[d])
            self.item[tuple(r)] = i

    def allowed(self, prefix):
        return sorted(self.next.get(tuple(prefix), ()))

    def is_node(self, prefix):
        return tuple(prefix) in self.next or tuple(prefix) in self.item


# Ragged sets over a small alphabet so that prefixes are shared and some items are prefixes of
# others; unique rows because a trie item is a distinct sequence.
item_sets = st.lists(
    st.lists(st.integers(0, 5), min_size=1, max_size=6).map(tuple),
    min_size=1, max_size=40, unique=True)


@settings(max_examples=150, deadline=None)
@given(rows=item_sets, data=st.data())
def test_matches_python_model(rows, data):
    trie, model = PrefixTrie(pad(rows)), Model(rows)
    prefixes = {tuple(r[:d]) for r in rows for d in range(len(r) + 1)}
    assert trie.num_items == len(rows)
    assert trie.num_nodes == len(prefixes)
    assert trie.max_depth == max(len(r) for r in rows)

    # allowed() on every real prefix and on random (mostly unknown) ones
    probes = sorted(prefixes) + [tuple(p) for p in data.draw(
        st.lists(st.lists(st.integers(0, 6), max_size=7), max_size=10))]
    for p in probes:
        assert trie.allowed(np.array(p, dtype=np.int64)).tolist() == model.allowed(p)

    # walk every prefix from the root in batched steps; node ids name prefixes one-to-one
    node_of = {(): 0}
    for depth in range(1, trie.max_depth + 2):
        parents = [p for p in node_of if len(p) == depth - 1]
        cand = [(p, t) for p in parents for t in range(-1, 8)]
        if not cand:
            break
        got = trie.walk(np.array([node_of[p] for p, _ in cand]), np.array([t for _, t in cand]))
        for (p, t), child in zip(cand, got.tolist()):
            if t >= 0 and model.is_node(p + (t,)):
                assert child > 0
                node_of[p + (t,)] = child
            else:
                assert child == -1
    assert len(set(node_of.values())) == len(node_of) == len(prefixes)

    # item_of / lookup agree with the model
    keys = list(node_of)
    items = trie.item_of(np.array([node_of[p] for p in keys]))
    assert items.tolist() == [model.item.get(p, -1) for p in keys]
    queries = [list(p) for p in keys] + data.draw(
        st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=6), max_size=10))
    found = trie.lookup(pad(queries, width=7))
    assert found.tolist() == [model.item.get(tuple(q), -1) for q in queries]

    # common_prefix against a direct comparison, for random (query, item) pairs
    targets = data.draw(st.lists(st.integers(0, len(rows) - 1), min_size=len(queries),
                                 max_size=len(queries)))
    want = []
    for q, i in zip(queries, targets):
        l = 0
        while l < min(len(q), len(rows[i])) and q[l] == rows[i][l]:
            l += 1
        want.append(l)
    assert trie.common_prefix(pad(queries, width=7), np.array(targets)).tolist() == want

    # sequences() is the input, row for row
    assert np.array_equal(trie.sequences(), pad(rows))


# Sparse tokens over a wide range: children rarely fill a token range, so walks take the
# binary-search path (small alphabets above mostly take the direct-index one).
SPARSE = [0, 3, 4, 97, 1000, 65_535, 65_536, 2**31 - 2, 2**31 - 1]


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.lists(st.sampled_from(SPARSE), min_size=1, max_size=5).map(tuple),
                     min_size=1, max_size=30, unique=True),
       probes=st.lists(st.sampled_from(SPARSE + [1, 5, 96, 2**31 - 3]), min_size=1, max_size=5))
def test_sparse_tokens(rows, probes):
    trie, model = PrefixTrie(pad(rows)), Model(rows)
    for p in {tuple(r[:d]) for r in rows for d in range(len(r) + 1)}:
        assert trie.allowed(np.array(p, dtype=np.int64)).tolist() == model.allowed(p)
        nodes = np.zeros(1, np.int64)
        for t in p:
            nodes = trie.walk(nodes, np.array([t]))
        out = trie.walk(np.repeat(nodes, len(probes)), np.array(probes))
        for t, child in zip(probes, out.tolist()):
            assert (child >= 0) == model.is_node(p + (t,))


def test_lookup_needs_exact_rows():
    trie = PrefixTrie(pad([(1, 2), (1,)]))
    rows = np.array([[1, 2, -1], [1, -1, -1], [1, -1, 2], [1, -5, -1], [-1, -1, -1]])
    assert trie.lookup(rows).tolist() == [0, 1, -1, -1, -1]


def test_csr_arrays_describe_the_trie():
    rows = [(3, 1), (3, 2, 7), (3, 2), (0,), (5, 5, 5)]
    trie = PrefixTrie(pad(rows))
    a = trie.to_arrays()
    assert set(a) == {"indptr", "tokens", "children", "node_item", "node_depth", "parent"}
    assert all(v.dtype == np.int32 for v in a.values())
    assert np.array_equal(a["children"], np.arange(1, trie.num_nodes))
    # Rebuild every item's tokens from the arrays alone.
    for i, r in enumerate(rows):
        node = 0
        for t in r:
            lo, hi = a["indptr"][node], a["indptr"][node + 1]
            toks = a["tokens"][lo:hi]
            assert np.all(np.diff(toks) > 0)  # children sorted by token
            node = a["children"][lo + np.searchsorted(toks, t)]
            assert a["parent"][node] >= 0
        assert a["node_item"][node] == i and a["node_depth"][node] == len(r)


def test_breadth_first_numbering():
    rows = [(2, 9), (1, 4, 4), (1, 3)]
    d = PrefixTrie(pad(rows)).to_arrays()["node_depth"]
    assert np.all(np.diff(d) >= 0)


def test_torch_in_torch_out():
    trie = PrefixTrie(torch.tensor([[1, 2], [1, 3]]))
    nodes = trie.walk(torch.zeros(2, dtype=torch.long), torch.tensor([1, 1]))
    assert isinstance(nodes, torch.Tensor) and nodes.tolist() == [1, 1]
    assert trie.item_of(trie.walk(nodes, torch.tensor([3, 9]))).tolist() == [1, -1]
    assert trie.lookup(torch.tensor([[1, 2], [1, -1]])).tolist() == [0, -1]


def test_walk_keeps_shape_and_dead_rows():
    trie = PrefixTrie(pad([(1, 2), (1, 3)]))
    nodes = np.array([[0, -1], [1, 0]])
    out = trie.walk(nodes, np.array([[1, 1], [3, 7]]))
    assert out.shape == (2, 2)
    assert out[0, 1] == -1 and out[1, 1] == -1 and out[0, 0] == 1


@pytest.mark.parametrize("rows, message", [
    ([[1, 2], [3, 4], [1, 2]], "rows 0 and 2 are the same sequence"),
    ([[1, -1, 2]], "row 0: padding (-1) at column 1 before token 2"),
    ([[1, 2], [4, -3]], "row 1, column 1: token -3"),
    ([[1, 2], [-1, -1]], "row 1 is empty"),
])
def test_bad_sequences_name_the_rows(rows, message):
    with pytest.raises(GreamError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PrefixTrie(np.array(rows))


def test_bad_shapes_and_types():
    with pytest.raises(GreamError, match="2-D"):
        PrefixTrie(np.array([1, 2, 3]))
    with pytest.raises(GreamError, match="integers"):
        PrefixTrie(np.array([[1.5, 2.0]]))
    trie = PrefixTrie(np.array([[1, 2]]))
    with pytest.raises(GreamError, match=r"nodes\[1\] = 99 is not a node id"):
        trie.walk(np.array([0, 99]), np.array([1, 1]))
    with pytest.raises(GreamError, match="same shape|shape"):
        trie.walk(np.array([0, 0]), np.array([1]))
    with pytest.raises(GreamError, match=r"items\[0\] = 5 is not an item id"):
        trie.common_prefix(np.array([[1, 2]]), np.array([5]))


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    rows = {tuple(rng.integers(0, 50, rng.integers(1, 6)).tolist()) for _ in range(500)}
    trie = PrefixTrie(pad(sorted(rows, key=lambda r: (len(r), r))))
    path = tmp_path / "trie.safetensors"
    trie.save(path)
    back = PrefixTrie.load(path)
    for k, v in trie.to_arrays().items():
        assert np.array_equal(v, back.to_arrays()[k]), k
    assert [p.name for p in tmp_path.iterdir()] == ["trie.safetensors"]  # no temp file left


def test_load_rejects_other_files(tmp_path):
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, dtype=np.int32)}, str(tmp_path / "other.safetensors"),
              metadata={"format": "something-else"})
    with pytest.raises(GreamError, match="other.safetensors: metadata 'format'"):
        PrefixTrie.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file format")
    with pytest.raises(GreamError, match="junk.safetensors"):
        PrefixTrie.load(tmp_path / "junk.safetensors")
    with pytest.raises(GreamError, match="no such file"):
        PrefixTrie.load(tmp_path / "missing.safetensors")


def test_large_build_is_exact():
    """100k random SID-like items: every item is found and every prefix is a node."""
    rng = np.random.default_rng(0)
    codes = np.unique(rng.integers(0, 64, (100_000, 4)), axis=0)
    rng.shuffle(codes)
    seqs = codes + np.arange(4) * 64 + 1000
    trie = PrefixTrie(seqs)
    assert np.array_equal(trie.lookup(seqs), np.arange(len(seqs)))
    assert trie.num_nodes == 1 + sum(len(np.unique(codes[:, :d], axis=0)) for d in range(1, 5))
    assert trie.memory_bytes() <= 24 * (trie.num_nodes - 1)
