"""Trie-constrained top-k (Triton through the interpreter) against its torch reference and a
brute-force per-row computation, on a real PrefixTrie; and sampling among the children."""
import math

import pytest
import torch

from gream_fast import GreamError
from gream_fast.index import PrefixTrie
from gream_fast.kernels.trie_logits import sample_children, trie_topk, trie_topk_reference

# Three SID levels with their own token ranges: level l, code c -> token BASE + OFFS[l] + c.
CODES = (13, 20, 24)
OFFS = (0, 13, 33)
BASE = 2400
V_FULL = 2500  # > BLOCK_V (1024) and not a multiple of it; the SID tokens sit in the last tile
MAX_FAN = 24


def _token(level, code):
    return BASE + OFFS[level] + code


@pytest.fixture(scope="module")
def trie():
    """Random distinct 3-level items: 13 roots' children; below them fan-outs 1 (always one),
    3, 6, 7; at the last level 1, 2, 5, 11 or 24 (the whole level)."""
    g = torch.Generator().manual_seed(7)
    items = []
    for c0 in range(CODES[0]):
        fan1 = 1 if c0 == 0 else (3, 6, 7)[c0 % 3]
        for c1 in torch.randperm(CODES[1], generator=g)[:fan1].tolist():
            fan2 = (1, 2, 5, 11, 24)[int(torch.randint(0, 5, (), generator=g))]
            for c2 in torch.randperm(CODES[2], generator=g)[:fan2].tolist():
                items.append([_token(0, c0), _token(1, c1), _token(2, c2)])
    t = PrefixTrie(torch.tensor(items))
    arrays = {k: torch.from_numpy(v) for k, v in t.to_arrays().items()}
    fan = (arrays["indptr"][1:] - arrays["indptr"][:-1])
    assert fan.max() == MAX_FAN and (fan == 1).any() and (fan == 0).any()
    return t, arrays


def _rows_at(arrays, g, depths, per_depth):
    """Some nodes of each depth (random), plus two dead rows."""
    depth = arrays["node_depth"].long()
    picks = []
    for d in depths:
        ids = torch.nonzero(depth == d).squeeze(1)
        picks += ids[torch.randperm(ids.numel(), generator=g)[:per_depth]].tolist()
    picks[1:1] = [-1]
    picks.append(-1)
    return torch.tensor(picks, dtype=torch.int32)


def _assert_close(x, y, tol=1e-5):
    """|x - y| <= tol (1 + |y|) where finite; the same NaNs and infinities. (The first
    torch.testing.assert_close imports sympy: seconds this file does not need to spend.)"""
    assert x.shape == y.shape
    assert torch.equal(x.isnan(), y.isnan())
    inf = y.isinf()
    assert torch.equal(x[inf], y[inf])
    fin = torch.isfinite(y)
    assert ((x[fin] - y[fin]).abs() <= tol * (1 + y[fin].abs())).all(), (x, y)


def _assert_same(out, ref):
    scores, token_ids, child_nodes = out
    rs, rt, rc = ref
    assert scores.dtype == torch.float32 and token_ids.dtype == torch.int64
    assert child_nodes.dtype == torch.int32
    assert torch.equal(token_ids, rt)
    assert torch.equal(child_nodes, rc)
    _assert_close(scores, rs)


def _assert_consistent(t, arrays, logits, nodes, out, token_offset=0):
    """Every listed child is a real child (walk), its score is the full-row log-softmax, the
    scores descend, and padding is (-inf, -1, -1) after the children only."""
    scores, token_ids, child_nodes = out
    logp = torch.log_softmax(logits.float(), -1)
    ok = token_ids >= 0
    assert torch.equal(ok, child_nodes >= 0)
    assert (scores[~ok] == float("-inf")).all()
    assert (ok[:, 1:] <= ok[:, :-1]).all()  # children first, then padding
    assert (scores[:, 1:] <= scores[:, :-1]).all()
    r, j = torch.nonzero(ok, as_tuple=True)
    walked = t.walk(nodes.long()[r], token_ids[r, j])
    assert torch.equal(walked.long(), child_nodes[r, j].long())
    _assert_close(scores[r, j], logp[r, token_ids[r, j] - token_offset])


# ---------------------------------------------------------------------------------------------
# trie_topk
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, k, max_children", [
    (torch.float32, 1, None), (torch.float32, 5, MAX_FAN), (torch.float32, 40, 40),
    (torch.bfloat16, 7, None), (torch.float16, 3, MAX_FAN)])
def test_full_vocabulary_matches_reference(trie, dtype, k, max_children, poisoned_empty):
    t, a = trie
    g = torch.Generator().manual_seed(k * 10 + len(str(dtype)))
    nodes = _rows_at(a, g, depths=(0, 1, 2, 3), per_depth=4)  # depth 3: leaves, no children
    logits = (torch.randn(nodes.numel(), V_FULL, generator=g) * 3).to(dtype)
    out = trie_topk(logits, nodes, a["indptr"], a["tokens"], k, max_children=max_children)
    _assert_same(out, trie_topk_reference(logits, nodes, a["indptr"], a["tokens"], k))
    _assert_consistent(t, a, logits, nodes, out)
    dead_or_leaf = (nodes < 0) | (a["node_depth"][nodes.long().clamp(min=0)] == 3)
    assert (out[1][dead_or_leaf] == -1).all() and (out[1][~dead_or_leaf, 0] >= 0).all()
    if k == 40:  # k beyond every fan-out: the tail is padding
        assert (out[1][:, MAX_FAN:] == -1).all()


@pytest.mark.parametrize("level, dtype", [(0, torch.float32), (1, torch.float32),
                                          (1, torch.bfloat16), (2, torch.float32)])
def test_slice_mode_matches_reference(trie, level, dtype, poisoned_empty):
    """The level's rows of the LM head as a strided view of the full logits; at level 1 the
    slice leaves out the first and last two codes, so some children fall outside it."""
    t, a = trie
    g = torch.Generator().manual_seed(100 + level)
    nodes = _rows_at(a, g, depths=(level, level, 3), per_depth=3)  # + leaves, dead rows
    nodes = torch.cat([nodes, torch.tensor([0 if level else 1], dtype=torch.int32)])  # wrong level
    full = torch.randn(nodes.numel(), V_FULL, generator=g).to(dtype)
    lo, hi = _token(level, 0), _token(level, CODES[level])
    if level == 1:
        lo, hi = lo + 2, hi - 2
    view = full[:, lo:hi]
    assert view.stride(0) == V_FULL
    k = MAX_FAN
    out = trie_topk(view, nodes.long(), a["indptr"], a["tokens"], k, token_offset=lo,
                    max_children=MAX_FAN)
    _assert_same(out, trie_topk_reference(view, nodes, a["indptr"], a["tokens"], k, lo))
    _assert_same(out, trie_topk(view.contiguous(), nodes, a["indptr"], a["tokens"], k, lo))
    _assert_consistent(t, a, view, nodes, out, token_offset=lo)
    listed = out[1][out[1] >= 0]
    assert ((listed >= lo) & (listed < hi)).all()
    assert (out[1][-1] == -1).all()  # a node of another level: every child outside the slice
    if level == 1:  # the dropped children exist
        kids = torch.cat([torch.from_numpy(t.allowed([_token(0, c)])) for c in range(CODES[0])])
        assert ((kids < lo) | (kids >= hi)).any()


def test_brute_force_tiny(poisoned_empty):
    items = [[3, 1, 4], [3, 1, 5], [3, 2, 0], [6, 0, 0], [6, 5], [1, 1, 1], [3, 1, 6]]
    t = PrefixTrie([r + [-1] * (3 - len(r)) for r in items])
    a = {k: torch.from_numpy(v) for k, v in t.to_arrays().items()}
    prefixes = [[], [3], [3, 1], [6], [6, 5], [1, 1], [3, 2, 0]]  # the last two: 1 and 0 children
    nodes = torch.tensor([int(t.walk([0], [p[0]])[0]) if p else 0 for p in prefixes])
    for i, p in enumerate(prefixes):
        for tok in p[1:]:
            nodes[i] = int(t.walk([int(nodes[i])], [tok])[0])
    nodes = torch.cat([nodes, torch.tensor([-1])])
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(nodes.numel(), 7, generator=g)
    logits[0, 3] = logits[0, 6] = 5.0  # a tie at the top of the root: token 3 before 6
    k = 4
    scores, token_ids, child_nodes = trie_topk(logits, nodes, a["indptr"], a["tokens"], k)
    for r in range(nodes.numel()):
        row = logits[r].tolist()
        lse = math.log(sum(math.exp(v) for v in row))
        allowed = t.allowed(prefixes[r]).tolist() if r < len(prefixes) else []
        want = sorted(((row[tok] - lse, tok) for tok in allowed), key=lambda st: (-st[0], st[1]))
        want = want[:k] + [(float("-inf"), -1)] * (k - len(want[:k]))
        assert token_ids[r].tolist() == [tok for _, tok in want]
        for (s, tok), got, child in zip(want, scores[r].tolist(), child_nodes[r].tolist()):
            assert got == pytest.approx(s, abs=1e-5) or (s == got == float("-inf"))
            assert child == (-1 if tok < 0 else int(t.walk([int(nodes[r])], [tok])[0]))
    assert token_ids[0, :2].tolist() == [3, 6]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_ties_go_to_the_lower_token(trie, dtype, poisoned_empty):
    t, a = trie
    nodes = torch.tensor([0, 0, 0], dtype=torch.int32)
    root_kids = torch.from_numpy(t.allowed([])).long()
    logits = torch.zeros(3, V_FULL, dtype=dtype)
    logits[0, root_kids] = 1.0  # all 13 equal
    logits[1, root_kids] = torch.tensor([0.5, 2.0, 0.5, 2.0, 1.0, 0.5, 1, 1, 1, 2, 0.5, 0, 0],
                                        dtype=dtype)
    logits[2, root_kids[::2]] = 3.0  # ties among every other child, the rest 0
    out = trie_topk(logits, nodes, a["indptr"], a["tokens"], 13, max_children=MAX_FAN)
    _assert_same(out, trie_topk_reference(logits, nodes, a["indptr"], a["tokens"], 13))
    assert out[1][0].tolist() == root_kids.tolist()
    order = sorted(range(13), key=lambda i: (-logits[1, root_kids[i]].item(), root_kids[i]))
    assert out[1][1].tolist() == root_kids[order].tolist()
    assert out[1][2].tolist() == root_kids[::2].tolist() + root_kids[1::2].tolist()


def test_infinite_and_nan_logits(trie, poisoned_empty):
    """-inf outside the children (a pre-masked vocabulary: whole -inf tiles), a child with a
    -inf logit (listed, score -inf, before the padding), and a NaN row (NaN scores, token
    order)."""
    t, a = trie
    g = torch.Generator().manual_seed(5)
    root_kids = torch.from_numpy(t.allowed([])).long()
    nodes = torch.tensor([0, 0, 0], dtype=torch.int32)
    logits = torch.full((3, V_FULL), float("-inf"))
    logits[:, root_kids] = torch.randn(3, root_kids.numel(), generator=g)
    logits[1, root_kids[4]] = float("-inf")
    logits[2, 17] = float("nan")
    out = trie_topk(logits, nodes, a["indptr"], a["tokens"], 16)
    _assert_same(out, trie_topk_reference(logits, nodes, a["indptr"], a["tokens"], 16))
    _assert_close(out[0][0, :13].exp().sum(), torch.tensor(1.0))
    assert out[1][1, 12] == root_kids[4] and out[0][1, 12] == float("-inf")
    assert out[1][1, 13:].tolist() == [-1] * 3
    assert out[0][2, :13].isnan().all() and out[1][2, :13].tolist() == root_kids.tolist()


def test_max_children_below_a_fan_out_truncates_alike(trie, poisoned_empty):
    t, a = trie
    g = torch.Generator().manual_seed(9)
    nodes = _rows_at(a, g, depths=(0, 1, 2), per_depth=3)
    logits = torch.randn(nodes.numel(), V_FULL, generator=g)
    for m in (1, 5):
        out = trie_topk(logits, nodes, a["indptr"], a["tokens"], 8, max_children=m)
        _assert_same(out, trie_topk_reference(logits, nodes, a["indptr"], a["tokens"], 8,
                                              max_children=m))
        assert ((out[1] >= 0).sum(1) <= m).all()


def test_node_ids_out_of_range(trie):
    t, a = trie
    n = t.num_nodes
    logits = torch.zeros(3, V_FULL)
    bad = torch.tensor([0, n, -1])
    for fn in (trie_topk, trie_topk_reference):
        with pytest.raises(GreamError, match=rf"nodes\[1\] = {n}: expected a trie node id"):
            fn(logits, bad, a["indptr"], a["tokens"], 2)
    with pytest.raises(GreamError, match=r"nodes\[0\] = -2"):
        trie_topk(logits, torch.tensor([-2, 0, 0]), a["indptr"], a["tokens"], 2)
    # unchecked (max_children given): the kernel makes it a dead row, never an OOB read
    s, tok, child = trie_topk(logits, bad, a["indptr"], a["tokens"], 2, max_children=MAX_FAN)
    assert tok[1:].tolist() == [[-1, -1]] * 2 and child[1:].tolist() == [[-1, -1]] * 2
    assert (s[1:] == float("-inf")).all() and (tok[0] >= 0).all()


def test_empty_batch_and_column_strided_logits(trie):
    t, a = trie
    s, tok, child = trie_topk(torch.zeros(0, 30), torch.zeros(0, dtype=torch.int32),
                              a["indptr"], a["tokens"], 3)
    assert s.shape == tok.shape == child.shape == (0, 3)
    g = torch.Generator().manual_seed(2)
    logits_t = torch.randn(V_FULL, 4, generator=g).T  # column stride 4: copied
    nodes = torch.tensor([0, 1, 2, 3])
    _assert_same(trie_topk(logits_t, nodes, a["indptr"], a["tokens"], 6),
                 trie_topk_reference(logits_t.contiguous(), nodes, a["indptr"], a["tokens"], 6))


def test_bad_inputs(trie):
    _, a = trie
    ip, tk = a["indptr"], a["tokens"]
    x, nodes = torch.zeros(2, 10), torch.tensor([0, 1])
    with pytest.raises(GreamError, match="k: expected a positive integer"):
        trie_topk(x, nodes, ip, tk, 0)
    with pytest.raises(GreamError, match=r"nodes: expected an integer tensor of shape \[2\]"):
        trie_topk(x, torch.tensor([0, 1, 2]), ip, tk, 2)
    with pytest.raises(GreamError, match="nodes: expected an integer tensor"):
        trie_topk(x, torch.tensor([0.0, 1.0]), ip, tk, 2)
    with pytest.raises(GreamError, match="logits: expected a float"):
        trie_topk(torch.zeros(10), nodes, ip, tk, 2)
    with pytest.raises(GreamError, match="logits: expected a float"):
        trie_topk_reference(torch.zeros(2, 10, dtype=torch.long), nodes, ip, tk, 2)
    with pytest.raises(GreamError, match="V = 0"):
        trie_topk(torch.zeros(2, 0), nodes, ip, tk, 2)
    with pytest.raises(GreamError, match="token_offset"):
        trie_topk(x, nodes, ip, tk, 2, token_offset=-1)
    with pytest.raises(GreamError, match="max_children"):
        trie_topk(x, nodes, ip, tk, 2, max_children=0)
    with pytest.raises(GreamError, match="indptr: expected"):
        trie_topk(x, nodes, ip.float(), tk, 2)
    with pytest.raises(GreamError, match="tokens: expected"):
        trie_topk(x, nodes, ip, tk[None], 2)


# ---------------------------------------------------------------------------------------------
# sample_children
# ---------------------------------------------------------------------------------------------
def _children_of_batch(trie, seed, rows=12):
    t, a = trie
    g = torch.Generator().manual_seed(seed)
    nodes = _rows_at(a, g, depths=(0, 1, 2), per_depth=rows // 3)
    nodes = nodes[nodes >= 0]  # live rows only
    logits = torch.randn(nodes.numel(), V_FULL, generator=g) * 2
    return nodes, trie_topk(logits, nodes, a["indptr"], a["tokens"], MAX_FAN,
                            max_children=MAX_FAN)


def test_sampling_is_reproducible_and_picks_only_children(trie):
    t, _ = trie
    nodes, (scores, tokens, children) = _children_of_batch(trie, seed=1)
    reps = 200  # each row many times in one batch
    s, tk, ch = (x.repeat(reps, 1) for x in (scores, tokens, children))
    draws = [sample_children(s, tk, ch, temperature=1.3, top_p=0.9,
                             generator=torch.Generator().manual_seed(42)) for _ in range(2)]
    for x, y in zip(*draws):
        assert torch.equal(x, y)
    slot, token, child, logprob = draws[0]
    assert slot.dtype == token.dtype == torch.int64 and child.dtype == torch.int32
    rows = torch.arange(s.shape[0])
    assert (tk[rows, slot] >= 0).all() and torch.equal(token, tk[rows, slot])
    assert torch.equal(child, ch[rows, slot]) and torch.equal(logprob, s[rows, slot])
    assert torch.equal(t.walk(nodes.long().repeat(reps), token), child.long())
    other = sample_children(s, tk, ch, temperature=1.3, top_p=0.9,
                            generator=torch.Generator().manual_seed(43))[0]
    assert not torch.equal(slot, other)


def test_tiny_top_p_takes_the_argmax(trie):
    nodes, (scores, tokens, children) = _children_of_batch(trie, seed=2)
    slot, token, _, _ = sample_children(scores.repeat(50, 1), tokens.repeat(50, 1),
                                        children.repeat(50, 1), temperature=5.0, top_p=1e-6,
                                        generator=torch.Generator().manual_seed(0))
    assert (slot == 0).all() and torch.equal(token, tokens[:, 0].repeat(50))
    # equal top scores: the lower token (the earlier slot) is the argmax
    s = torch.tensor([[-1.0, -1.0, -2.0], [-0.5, -3.0, -3.0]])
    tk = torch.tensor([[4, 9, 11], [2, 3, 8]])
    slot = sample_children(s, tk, tk.int(), top_p=0.01,
                           generator=torch.Generator().manual_seed(0))[0]
    assert slot.tolist() == [0, 0]


def test_temperature_and_nucleus_frequencies():
    """Fixed seed, 20000 draws, tolerance 0.02 (> 5 standard deviations)."""
    s = torch.tensor([-0.5, -1.0, -2.0, float("-inf"), float("-inf")])
    tk = torch.tensor([3, 1, 7, 9, -1])  # a -inf child and a padding slot: never drawn
    n = 20000
    S, T = s.repeat(n, 1), tk.repeat(n, 1)
    top_freq = []
    for temp in (0.25, 1.0, 4.0):
        slot = sample_children(S, T, T.int(), temperature=temp,
                               generator=torch.Generator().manual_seed(3))[0]
        freq = torch.bincount(slot, minlength=5).double() / n
        p = torch.softmax(s[:3].double() / temp, 0)
        assert (freq[:3] - p).abs().max() < 0.02 and freq[3:].sum() == 0
        top_freq.append(freq[0].item())
    assert top_freq[0] > top_freq[1] > top_freq[2]
    # nucleus: p = [.5, .3, .2]; top_p = 0.7 keeps the first two, renormalised to [.625, .375]
    s = torch.tensor([0.5, 0.3, 0.2]).log()
    slot = sample_children(s.repeat(n, 1), T[:, :3], T[:, :3].int(), top_p=0.7,
                           generator=torch.Generator().manual_seed(4))[0]
    freq = torch.bincount(slot, minlength=3).double() / n
    assert abs(freq[0] - 0.625) < 0.02 and freq[2] == 0


def test_sampling_bad_inputs():
    s, tk = torch.tensor([[-1.0, -2.0], [float("-inf"), float("-inf")]]), torch.tensor([[1, 2],
                                                                                       [3, -1]])
    with pytest.raises(GreamError, match=r"scores\[1\]: no child to sample"):
        sample_children(s, tk, tk.int())
    with pytest.raises(GreamError, match="temperature"):
        sample_children(s[:1], tk[:1], tk[:1].int(), temperature=0)
    with pytest.raises(GreamError, match="top_p"):
        sample_children(s[:1], tk[:1], tk[:1].int(), top_p=0)
    with pytest.raises(GreamError, match="token_ids: expected"):
        sample_children(s, tk[:1], tk.int())


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
def _big_case(device, rows, vocab, seed=0):
    """A 256 x 256 x 256 SID trie (~30k items), bf16 logits: the kernel on `device` against
    the reference on CPU, full vocabulary and the level-1 slice."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (30000, 3), generator=g).unique(dim=0)
    base = vocab - 800
    t = PrefixTrie(base + codes + torch.tensor([0, 256, 512]))
    a = {k: torch.from_numpy(v) for k, v in t.to_arrays().items()}
    ip, tk = a["indptr"], a["tokens"]
    depth = a["node_depth"].long()
    nodes = torch.cat([torch.nonzero(depth == d).squeeze(1)[:rows // 4] for d in range(4)])
    nodes[::7] = -1
    logits = (torch.randn(nodes.numel(), vocab, generator=g) * 2).bfloat16()
    dev = {k: v.to(device) for k, v in (("ip", ip), ("tk", tk))}
    for k in (1, 10, 256):
        out = trie_topk(logits.to(device), nodes.to(device), dev["ip"], dev["tk"], k,
                        max_children=256)
        ref = trie_topk_reference(logits, nodes, ip, tk, k)
        assert torch.equal(out[1].cpu(), ref[1]) and torch.equal(out[2].cpu(), ref[2])
        _assert_close(out[0].cpu(), ref[0], tol=1e-4)
    lo = base + 256
    level1 = logits[:, lo:lo + 256]
    out = trie_topk(level1.to(device), nodes.to(device), dev["ip"], dev["tk"], 16,
                    token_offset=lo, max_children=256)
    ref = trie_topk_reference(level1, nodes, ip, tk, 16, token_offset=lo)
    assert torch.equal(out[1].cpu(), ref[1]) and torch.equal(out[2].cpu(), ref[2])
    _assert_close(out[0].cpu(), ref[0], tol=1e-4)
    scores, token_ids, child_nodes = trie_topk(logits.to(device), nodes.to(device), dev["ip"],
                                               dev["tk"], 256, max_children=256)
    live = (token_ids[:, 0] >= 0).nonzero().squeeze(1)
    gen = torch.Generator(device=device).manual_seed(0)
    _, token, child, _ = sample_children(scores[live], token_ids[live], child_nodes[live],
                                         temperature=0.7, top_p=0.95, generator=gen)
    assert torch.equal(t.walk(nodes[live.cpu()], token.cpu()), child.cpu().long())


@pytest.mark.gpu
def test_cuda_kernel_matches_reference():
    _big_case("cuda", rows=400, vocab=151_936)
