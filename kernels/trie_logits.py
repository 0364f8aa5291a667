"""Trie-constrained decoding step: log-softmax, mask to the trie node's children, top-k.

Each row r (a beam or a sample) sits at a node v_r of the prefix trie over item token sequences
(gream_fast.index.PrefixTrie(...).to_arrays(): CSR `indptr` [num_nodes + 1] and `tokens`
[num_edges], int32; the children of v are the edges e in indptr[v] .. indptr[v+1] - 1, edge e
carries token tokens[e], sorted ascending within a node, and leads to node e + 1). For a row of
logits x [V] whose column j is token token_offset + j,

    lse     = log sum_j exp(x_j)                       over the WHOLE row, all V columns
    s_e     = x[tokens[e] - token_offset] - lse        for the children e of v_r
    output  = the k children of largest s_e, descending; equal scores: lower token first.

token_offset = 0 with full-vocabulary logits gives the model's true next-token log-probs; with
a slice of the vocabulary (the current SID level's rows of the LM head, token_offset = the
level's first token) the normalisation is over that slice only. A child whose token lies
outside [token_offset, token_offset + V) is dropped (it is never read). Slots beyond the
row's children are padding: score -inf, token -1, child -1; a dead row (node -1) is all
padding. A child whose logit is -inf is still a child: it is listed, with score -inf, before
the padding. NaN scores (a NaN or +inf logit makes the whole row's lse NaN) are reported as
they are and ranked as -inf.

The Triton kernel runs one program per row: pass 1 is an online max / sum-exp over the row in
BLOCK_V tiles (float32 whatever the input dtype); pass 2 gathers the node's (at most
max_children) children, turns their logits into log-probs and extracts the top k by rounds of
(largest score, lowest token among equal scores). `max_children` bounds every node's fan-out
and fixes the kernel's child block; when it is None it is computed from indptr, which costs a
host sync (the same transfer also checks the node ids), so callers on the hot path pass it.
With max_children given, a node id outside [0, num_nodes) makes a dead row in the kernel (the
reference raises); a bound below a real fan-out keeps only that node's first max_children
children (lowest tokens) in both.

sample_children() runs after the kernel (call trie_topk with k = max_children to get every
child) and draws one child per row from the children's renormalised distribution.
"""
import operator

import torch
import triton
import triton.language as tl

from gream_fast.errors import InvalidInputError
from gream_fast.kernels._backend import use_triton

__all__ = ["trie_topk", "trie_topk_reference", "sample_children"]

_NEG_INF = float("-inf")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# 0. Argument checks (shared by the reference and the public function)
# ---------------------------------------------------------------------------------------------
def _is_int(t):
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _check(logits, nodes, indptr, tokens, k, token_offset, max_children):
    if logits.dim() != 2 or not logits.is_floating_point():
        raise InvalidInputError(f"logits: expected a float [R, V] tensor, got {logits.dtype} of "
                                f"shape {list(logits.shape)}")
    if logits.shape[1] == 0:
        raise InvalidInputError("logits: expected at least one column (V >= 1), got V = 0")
    if nodes.dim() != 1 or nodes.shape[0] != logits.shape[0] or not _is_int(nodes):
        raise InvalidInputError(f"nodes: expected an integer tensor of shape [{logits.shape[0]}] "
                                f"(one trie node per logits row), got {nodes.dtype} of shape "
                                f"{list(nodes.shape)}")
    if indptr.dim() != 1 or indptr.shape[0] < 1 or not _is_int(indptr):
        raise InvalidInputError(f"indptr: expected a 1-D integer tensor [num_nodes + 1], got "
                                f"{indptr.dtype} of shape {list(indptr.shape)}")
    if tokens.dim() != 1 or not _is_int(tokens):
        raise InvalidInputError(f"tokens: expected a 1-D integer tensor [num_edges], got "
                                f"{tokens.dtype} of shape {list(tokens.shape)}")
    for name, t in (("nodes", nodes), ("indptr", indptr), ("tokens", tokens)):
        if t.device != logits.device:
            raise InvalidInputError(f"{name} is on {t.device} but logits on {logits.device}")
    k = _check_int("k", k, 1, "a positive integer")
    token_offset = _check_int("token_offset", token_offset, 0, "a non-negative integer")
    if max_children is not None:
        max_children = _check_int("max_children", max_children, 1, "None or a positive integer")
    return k, token_offset, max_children


def _check_int(name, value, lowest, what):
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= lowest
    except TypeError:
        ok = False
    if not ok:
        raise InvalidInputError(f"{name}: expected {what}, got {value!r}")
    return operator.index(value)


def _check_nodes_and_fanout(nodes, indptr):
    """Node ids in [-1, num_nodes) (else InvalidInputError) and the largest fan-out: one host
    transfer."""
    num_nodes = indptr.shape[0] - 1
    zero = torch.zeros((), dtype=torch.int64, device=indptr.device)
    fan = (indptr[1:] - indptr[:-1]).max().long() if num_nodes else zero
    lo, hi = (nodes.min().long(), nodes.max().long()) if nodes.numel() else (zero, zero)
    fan, lo, hi = torch.stack([fan, lo, hi]).tolist()
    if lo < -1 or hi >= num_nodes:
        bad_mask = (nodes < -1) | (nodes >= num_nodes)
        bad = torch.nonzero(bad_mask)[0].item()
        raise InvalidInputError(f"nodes[{bad}] = {nodes[bad].item()}: expected a trie node id in "
                                f"0..{num_nodes - 1}, or -1 for a dead row")
    return fan


# ---------------------------------------------------------------------------------------------
# 1. Reference (plain torch, the oracle)
# ---------------------------------------------------------------------------------------------
def trie_topk_reference(logits, nodes, indptr, tokens, k, token_offset=0, max_children=None):
    """(scores float32 [R, k], token_ids int64 [R, k], child_nodes int32 [R, k]): see the
    module docstring. Checks every node id."""
    k, token_offset, max_children = _check(logits, nodes, indptr, tokens, k, token_offset,
                                           max_children)
    _check_nodes_and_fanout(nodes, indptr)
    R, V = logits.shape
    dev = logits.device
    nodes, indptr, tokens = nodes.long(), indptr.long(), tokens.long()

    # The children of each row as a padded [R, width] table of edges, in the trie's token order.
    alive = nodes >= 0
    node = nodes.clamp(min=0)
    start = indptr[node]
    count = torch.where(alive, indptr[node + 1] - start, 0)
    if max_children is not None:
        count = count.clamp(max=max_children)
    width = max(int(count.max()) if R else 0, 1)
    slot = torch.arange(width, device=dev)
    valid = slot[None, :] < count[:, None]
    edge = torch.where(valid, start[:, None] + slot[None, :], 0)
    tok = torch.zeros_like(edge)
    tok[valid] = tokens[edge[valid]]
    col = tok - token_offset
    valid &= (col >= 0) & (col < V)  # children outside the slice are dropped

    logp = torch.log_softmax(logits.float(), dim=-1)
    score = torch.where(valid, logp.gather(1, torch.where(valid, col, 0)), _NEG_INF)

    # Order: score descending (NaN ranks as -inf), then token ascending, padding last.
    key = torch.where(score.isnan(), _NEG_INF, score)
    tok_key = torch.where(valid, tok, torch.iinfo(torch.int64).max)
    by_token = tok_key.argsort(dim=1, stable=True)
    order = by_token.gather(1, key.gather(1, by_token).argsort(dim=1, descending=True,
                                                                stable=True))
    order = order[:, :k]
    keep = valid.gather(1, order)
    n = order.shape[1]
    scores = torch.full((R, k), _NEG_INF, dtype=torch.float32, device=dev)
    token_ids = torch.full((R, k), -1, dtype=torch.int64, device=dev)
    child_nodes = torch.full((R, k), -1, dtype=torch.int32, device=dev)
    scores[:, :n] = torch.where(keep, score.gather(1, order), _NEG_INF)
    token_ids[:, :n] = torch.where(keep, tok.gather(1, order), -1)
    child_nodes[:, :n] = torch.where(keep, edge.gather(1, order) + 1, -1).int()
    return scores, token_ids, child_nodes


# ---------------------------------------------------------------------------------------------
# 2. Triton kernel: one program per row
# ---------------------------------------------------------------------------------------------
@triton.jit
def _trie_topk_kernel(logits_ptr, nodes_ptr, indptr_ptr, tokens_ptr,
                      scores_ptr, token_ids_ptr, child_ptr,
                      V, stride_row, num_nodes, token_offset, max_children, K,
                      BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)

    # The node's children: edges start .. start + count - 1 (count <= max_children <= BLOCK_C).
    node = tl.load(nodes_ptr + row).to(tl.int64)
    alive = (node >= 0) & (node < num_nodes)  # out of range: a dead row, never an OOB read
    node = tl.where(alive, node, 0)
    start = tl.load(indptr_ptr + node, mask=alive, other=0)
    end = tl.load(indptr_ptr + node + 1, mask=alive, other=0)
    count = tl.minimum(end - start, max_children)
    slots = tl.arange(0, BLOCK_C)
    edge = start + slots
    valid = slots < count
    tok = tl.load(tokens_ptr + edge, mask=valid, other=0)
    col = tok - token_offset
    valid = valid & (col >= 0) & (col < V)  # outside the slice: dropped
    n_valid = tl.sum(valid.to(tl.int32), axis=0)

    # Pass 1: log-sum-exp of the whole row, online over BLOCK_V tiles (skipped when no child).
    row_ptr = logits_ptr + row * stride_row
    v_end = tl.where(n_valid > 0, V, 0)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    for v0 in range(0, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
    lse = m + tl.log(tl.where(n_valid > 0, s, 1.0))  # a dead row's lse is unused

    # Pass 2: the children's log-probs, then k rounds of (max score, lowest token among ties).
    x_c = tl.load(row_ptr + col, mask=valid, other=0.0).to(tl.float32)  # padding: unused
    score = x_c - lse
    key = tl.where(score == score, score, float("-inf"))  # NaN ranks as -inf
    avail = valid
    kk = tl.arange(0, BLOCK_K)
    out_s = tl.full([BLOCK_K], float("-inf"), tl.float32)
    out_t = tl.full([BLOCK_K], -1, tl.int64)
    out_c = tl.full([BLOCK_K], -1, tl.int32)
    for j in range(0, tl.minimum(n_valid, K)):  # <= BLOCK_K rounds
        best = tl.max(tl.where(avail, key, float("-inf")), axis=0)
        cand = avail & (key == best)  # never empty: j < n_valid
        t = tl.min(tl.where(cand, tok, 2147483647), axis=0)
        hit = cand & (tok == t)  # one slot: tokens are distinct within a node
        avail = avail & (tok != t)
        sel = kk == j
        out_s = tl.where(sel, tl.sum(tl.where(hit, score, 0.0), axis=0), out_s)
        out_t = tl.where(sel, t.to(tl.int64), out_t)
        out_c = tl.where(sel, tl.min(tl.where(hit, edge, 2147483647), axis=0) + 1, out_c)

    out = row * K
    tl.store(scores_ptr + out + kk, out_s, mask=kk < K)
    tl.store(token_ids_ptr + out + kk, out_t, mask=kk < K)
    tl.store(child_ptr + out + kk, out_c, mask=kk < K)
    for k0 in range(BLOCK_K, K, BLOCK_K):  # k > BLOCK_C: the rest is padding
        kr = k0 + kk
        tl.store(scores_ptr + out + kr, tl.full([BLOCK_K], float("-inf"), tl.float32),
                 mask=kr < K)
        tl.store(token_ids_ptr + out + kr, tl.full([BLOCK_K], -1, tl.int64), mask=kr < K)
        tl.store(child_ptr + out + kr, tl.full([BLOCK_K], -1, tl.int32), mask=kr < K)


def _blocks(V, k, max_children):
    block_v = min(1024, max(16, triton.next_power_of_2(V)))
    block_c = max(16, triton.next_power_of_2(max_children))
    block_k = max(16, triton.next_power_of_2(min(k, block_c)))
    return block_v, block_c, block_k


def _trie_topk_triton(logits, nodes, indptr, tokens, k, token_offset, max_children):
    if logits.dtype not in _KERNEL_DTYPES:
        logits = logits.float()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if nodes.dtype not in (torch.int32, torch.int64):
        nodes = nodes.long()
    nodes = nodes.contiguous()
    indptr = indptr.to(torch.int32).contiguous()  # no copy for to_arrays()' int32
    tokens = tokens.to(torch.int32).contiguous()
    if tokens.numel() == 0:  # a trie without edges: nothing is ever read from it
        tokens = torch.zeros(1, dtype=torch.int32, device=tokens.device)
    R, V = logits.shape
    scores = torch.empty(R, k, dtype=torch.float32, device=logits.device)
    token_ids = torch.empty(R, k, dtype=torch.int64, device=logits.device)
    child_nodes = torch.empty(R, k, dtype=torch.int32, device=logits.device)
    if R == 0:
        return scores, token_ids, child_nodes
    block_v, block_c, block_k = _blocks(V, k, max_children)
    _trie_topk_kernel[(R,)](
        logits, nodes, indptr, tokens, scores, token_ids, child_nodes,
        V, logits.stride(0), indptr.shape[0] - 1, token_offset, max_children, k,
        BLOCK_V=block_v, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=4)
    return scores, token_ids, child_nodes


# ---------------------------------------------------------------------------------------------
# 3. Public entry points
# ---------------------------------------------------------------------------------------------
def trie_topk(logits: torch.Tensor, nodes: torch.Tensor, indptr: torch.Tensor,
              tokens: torch.Tensor, k: int, token_offset: int = 0,
              max_children: int | None = None):
    """Top-k children of each row's trie node by full-row log-softmax score.

    logits [R, V] (fp32/bf16/fp16; any row stride, unit column stride avoids a copy): column j
    is token token_offset + j. nodes [R] int32/int64: each row's trie node, -1 for a dead row.
    indptr, tokens: the trie's CSR arrays (int32, on the logits' device). max_children: an
    upper bound on any node's fan-out; None computes it (and checks the node ids) with a host
    sync. Returns (scores float32 [R, k], token_ids int64 [R, k], child_nodes int32 [R, k]),
    sorted by score descending, equal scores by lower token; missing slots are
    (-inf, -1, -1)."""
    k, token_offset, max_children = _check(logits, nodes, indptr, tokens, k, token_offset,
                                           max_children)
    if not use_triton(logits, nodes, indptr, tokens):
        return trie_topk_reference(logits, nodes, indptr, tokens, k, token_offset, max_children)
    if max_children is None:
        max_children = max(_check_nodes_and_fanout(nodes, indptr), 1)
    return _trie_topk_triton(logits, nodes, indptr, tokens, k, token_offset, max_children)


def sample_children(scores: torch.Tensor, token_ids: torch.Tensor, child_nodes: torch.Tensor,
                    temperature: float = 1.0, top_p: float = 1.0,
                    generator: torch.Generator | None = None, check: bool = True):
    """Sample one child per row from the children's distribution renormalised over the children.

    Inputs are trie_topk's outputs (call it with k = max_children to see every child). Over the
    valid slots (token >= 0, finite score), p ∝ exp(score / temperature); with
    top_p < 1 only the smallest prefix of the slots sorted by p (descending, equal p: the
    earlier slot, i.e. the lower token) whose mass reaches top_p stays (always at least one).
    `generator` must live on the scores' device. Returns (slot int64 [R], token int64 [R],
    child int32 [R], logprob float32 [R]) where logprob is the chosen slot's score, the
    full-row log-softmax (not renormalised over the children, no temperature). A row with no
    valid slot raises InvalidInputError (one host sync; check=False skips it, for loops that
    keep every row on a live node and must not wait for the host)."""
    if scores.dim() != 2 or not scores.is_floating_point() or scores.shape[1] == 0:
        raise InvalidInputError(f"scores: expected a float [R, k] tensor with k >= 1, got "
                                f"{scores.dtype} of shape {list(scores.shape)}")
    for name, t in (("token_ids", token_ids), ("child_nodes", child_nodes)):
        if t.shape != scores.shape or not _is_int(t) or t.device != scores.device:
            raise InvalidInputError(f"{name}: expected an integer tensor of shape "
                                    f"{list(scores.shape)} on {scores.device}, got {t.dtype} of "
                                    f"shape {list(t.shape)} on {t.device}")
    if not temperature > 0:
        raise InvalidInputError(f"temperature: expected a positive number, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise InvalidInputError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    R = scores.shape[0]
    dev = scores.device
    if R == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return (empty, empty.clone(), child_nodes.new_zeros(0),
                torch.zeros(0, dtype=torch.float32, device=dev))

    s = scores.float()
    valid = (token_ids >= 0) & torch.isfinite(s)
    has = valid.any(1)
    if check and not bool(has.all()):
        bad = torch.nonzero(~has)[0].item()
        raise InvalidInputError(f"scores[{bad}]: no child to sample (a dead row, or every child "
                                "has score -inf); sample only live rows")

    logit = torch.where(valid, s / temperature, _NEG_INF)
    order = logit.argsort(dim=1, descending=True, stable=True)  # identity on trie_topk output
    p = torch.softmax(logit.gather(1, order), dim=1)
    if top_p < 1:
        cum = torch.cumsum(p, dim=1)
        before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)  # mass ahead
        p = torch.where(before < top_p, p, 0.0)
    pick = torch.multinomial(p, 1, generator=generator)
    slot = order.gather(1, pick).squeeze(1)
    idx = slot[:, None]
    return (slot, token_ids.gather(1, idx).squeeze(1).long(), child_nodes.gather(1, idx).squeeze(1),
            s.gather(1, idx).squeeze(1))
