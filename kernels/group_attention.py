"""Shared-prefix ("group") attention for training: forward and backward, without a [T, T] mask.

SRPO/GRPO trains on groups: one prompt and its n sampled responses. Each group is packed once,
[prompt, response 1, ..., response n], and G groups back to back form one flat stream of N
tokens (no padding). A prompt token attends causally within its prompt; a token of response i
attends to its group's whole prompt and causally to response i's earlier tokens, never to
another response. Memory is linear in the tokens; the work per group and head is
~ P^2/2 + n R P + n R^2/2 score entries instead of T^2/2 (T = P + n R).

Layout (GroupLayout, int32 tensors on the tensors' device). One group, prompt p0..p2, responses
a (2 tokens) and b (3 tokens); x: query (row) attends key (column):

    keys ->   p0 p1 p2 a0 a1 b0 b1 b2       t   a_lo a_hi b_lo q_hi
    p0        x                             0    0    1    1    8     prompt: A = [0, t+1)
    p1        x  x                          1    0    2    2    8             B = [t+1, t+1) empty
    p2        x  x  x                       2    0    3    3    8
    a0        x  x  x  x                    3    0    3    3    5     response: A = the prompt
    a1        x  x  x  x  x                 4    0    3    3    5               B = [a0, t+1)
    b0        x  x  x        x              5    0    3    5    8
    b1        x  x  x        x  x           6    0    3    5    8
    b2        x  x  x        x  x  x        7    0    3    5    8

Query side: the keys of token t are A = [a_lo[t], a_hi[t]) and B = [b_lo[t], t + 1), disjoint.
Key side: the queries that attend key j are exactly [j, q_hi[j]): the group's end for a prompt
key, the response's end for a response key. seg_cu [S+1] holds the segments' starts (each
group's prompt, then its responses; S = G + the number of responses) and N; group_seg [G+1]
says which segments are group g's (group_seg[g], its prompt, .. group_seg[g+1]-1); group_cu
[G+1] the groups' token starts and N. Groups are concatenated in order.

q [N, Hq, D], k and v [N, Hkv, D]; GQA: query head h reads KV head h // (Hq / Hkv) (the Hugging
Face repeat_kv convention). s_ij = scale q_i.k_j (scale 1/sqrt(D) by default), softmax in
float32, o in q's dtype; lse_i = log sum_{j visible} exp(s_ij) in float32 ([N, Hq]).

Backward (FlashAttention-2), with P_ij = exp(s_ij - lse_i) over the visible pairs and the
incoming gradients dO (of o) and dlse (of lse, 0 when it is unused):
    delta_i = rowsum(dO_i * O_i) - dlse_i
    dV_j = sum_i P_ij dO_i,      dP_ij = dO_i . v_j,      dS_ij = P_ij (dP_ij - delta_i)
    dQ_i = scale sum_j dS_ij k_j,      dK_j = scale sum_i dS_ij q_i
(the lse term: d lse_i / d s_ij = P_ij, folded into delta). GQA: dK, dV of a KV head sum over
its query heads. Nothing of size [queries, keys] is kept: the forward saves q, k, v, o and lse,
and the backward recomputes P tile by tile.

Three paths, one contract (DESIGN.md):
1. group_attention_reference: readable torch, per group the prompt's causal attention and per
   response attention over [prompt keys, own response keys]; plain autograd. The oracle; it
   keeps every probability for its backward (sum over responses of R (P + R) per head).
2. Triton kernels (CUDA; the interpreter in tests), see the section header below.
3. group_attention dispatches: Triton on CUDA (and under TRITON_INTERPRET=1); on CPU torch's
   fused attention, one causal call per group over its n sequences [prompt, response i] (the
   fastest CPU path; the prompt's queries rerun n times inside the attention), or, when the
   caller wants the lse, a chunked torch path with its own autograd.Function (flash-style:
   saves q, k, v, o, lse and recomputes each chunk's scores in backward). Both keep CPU
   training's memory linear in tokens.
"""
import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gream_fast.errors import InvalidInputError
from gream_fast.kernels._backend import INTERPRET, use_triton
from gream_fast.kernels._flash import online_softmax_step

__all__ = ["GroupLayout", "group_layout", "group_attention", "group_attention_reference"]

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------------------------
# The layout
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class GroupLayout:
    """Per-token key ranges of a packed stream of groups (see the module docstring). Build it
    with group_layout; all tensors int32 on one device."""
    a_lo: torch.Tensor       # [N] keys of token t: [a_lo, a_hi) and [b_lo, t + 1)
    a_hi: torch.Tensor       # [N]
    b_lo: torch.Tensor       # [N]
    q_hi: torch.Tensor       # [N] queries of key j: [j, q_hi)
    group_cu: torch.Tensor   # [G+1] group g: tokens group_cu[g] .. group_cu[g+1]-1
    seg_cu: torch.Tensor     # [S+1] segment s: tokens seg_cu[s] .. seg_cu[s+1]-1
    group_seg: torch.Tensor  # [G+1] group g: segments group_seg[g] (prompt) .. group_seg[g+1]-1
    N: int
    G: int
    _cache: dict = field(default_factory=dict, repr=False)  # block tables, per block size

    @property
    def device(self) -> torch.device:
        return self.a_lo.device

    def to(self, device) -> "GroupLayout":
        return GroupLayout(*(getattr(self, f).to(device) for f in _LAYOUT_TENSORS), N=self.N,
                           G=self.G)


_LAYOUT_TENSORS = ("a_lo", "a_hi", "b_lo", "q_hi", "group_cu", "seg_cu", "group_seg")


def _descriptors(seg_cu, group_seg, n):
    """(a_lo, a_hi, b_lo, q_hi, group_cu) from the segment offsets, vectorised (any device)."""
    seg_cu, group_seg = seg_cu.long(), group_seg.long()
    S, G = seg_cu.shape[0] - 1, group_seg.shape[0] - 1
    t = torch.arange(n, device=seg_cu.device)
    # (the clamps change nothing for valid offsets; they keep a check of invalid ones in bounds)
    s = (torch.searchsorted(seg_cu, t, right=True) - 1).clamp(0, S - 1)    # each token's segment
    g = (torch.searchsorted(group_seg, s, right=True) - 1).clamp(0, G - 1)  # and group
    first = group_seg[g].clamp(0, S - 1)                                     # its prompt segment
    prompt = s == first
    ps, pe = seg_cu[first], seg_cu[first + 1]
    group_end = seg_cu[group_seg[g + 1].clamp(0, S)]
    a_lo = ps
    a_hi = torch.where(prompt, t + 1, pe)
    b_lo = torch.where(prompt, t + 1, seg_cu[s])
    q_hi = torch.where(prompt, group_end, seg_cu[s + 1])
    group_cu = seg_cu[group_seg.clamp(0, S)]
    return tuple(x.to(torch.int32) for x in (a_lo, a_hi, b_lo, q_hi, group_cu))


def _is_length(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1


def group_layout(prompt_lens, response_lens, device=None) -> GroupLayout:
    """The layout of G groups packed back to back: prompt_lens a list of G ints, response_lens a
    list of G lists of ints (group g: its prompt, then responses response_lens[g][0], ...). All
    lengths >= 1; a group may have no responses (its prompt alone: causal attention)."""
    prompt_lens, response_lens = list(prompt_lens), list(response_lens)
    if len(response_lens) != len(prompt_lens):
        raise InvalidInputError(f"response_lens: expected one list per group (G={len(prompt_lens)} "
                                f"prompt_lens), got {len(response_lens)}")
    sizes, group_seg = [], [0]
    for g, (p, rs) in enumerate(zip(prompt_lens, response_lens)):
        if not _is_length(p):
            raise InvalidInputError(f"prompt_lens[{g}]: expected an int >= 1, got {p!r}")
        if isinstance(rs, (numbers.Number, str, bytes)) or not hasattr(rs, "__iter__"):
            raise InvalidInputError(f"response_lens[{g}]: expected a list of ints, got {rs!r}")
        rs = list(rs)
        for i, r in enumerate(rs):
            if not _is_length(r):
                raise InvalidInputError(f"response_lens[{g}][{i}]: expected an int >= 1, got "
                                        f"{r!r}")
        sizes += [int(p)] + [int(r) for r in rs]
        group_seg.append(len(sizes))
    seg_cu = [0]
    for x in sizes:
        seg_cu.append(seg_cu[-1] + x)
    n = seg_cu[-1]
    if n >= 2 ** 31 - 2 ** 30:  # int32 positions, and 2^30 serves as "no key" in the kernels
        raise InvalidInputError(f"prompt_lens/response_lens: {n} tokens in all, expected < 2^30")
    seg_cu = torch.tensor(seg_cu, dtype=torch.int32, device=device)
    group_seg = torch.tensor(group_seg, dtype=torch.int32, device=device)
    a_lo, a_hi, b_lo, q_hi, group_cu = _descriptors(seg_cu, group_seg, n)
    return GroupLayout(a_lo, a_hi, b_lo, q_hi, group_cu, seg_cu, group_seg, N=n,
                       G=len(prompt_lens))


def _blocks(layout: GroupLayout, block: int, keys: bool) -> torch.Tensor:
    """[num, 2] int32 (start, end) of the blocks of `block` tokens that tile every group from its
    start (a block never straddles two groups; it may straddle a prompt and a response or two
    responses). num = cdiv(N, block) + G is a bound known without a host sync; the unused rows
    are (0, 0). Longest work first (LPT): for query blocks the span of their key ranges, for key
    blocks (keys=True) that of their query range. Cached on the layout."""
    key = (block, keys)
    if key not in layout._cache:
        gcu = layout.group_cu.long()
        G, dev = layout.G, gcu.device
        nb = (gcu[1:] - gcu[:-1] + block - 1) // block
        ends = nb.cumsum(0)
        p = torch.arange(triton.cdiv(layout.N, block) + G, device=dev)
        g = torch.searchsorted(ends, p, right=True)
        valid = g < G
        g = g.clamp(max=G - 1)
        start = gcu[g] + (p - (ends - nb)[g]) * block
        end = torch.minimum(start + block, gcu[g + 1])
        start, end = torch.where(valid, start, 0), torch.where(valid, end, 0)
        first, last = start.clamp(max=max(layout.N - 1, 0)), (end - 1).clamp(min=0)
        if keys:
            work = torch.maximum(layout.q_hi[first], layout.q_hi[last]).long() - start
        else:
            work = (layout.a_hi[last] - layout.a_lo[first]).long() + end - layout.b_lo[last]
        work = torch.where(valid, work, -1)
        order = torch.sort(work, descending=True, stable=True).indices
        layout._cache[key] = torch.stack([start, end], 1)[order].to(torch.int32).contiguous()
    return layout._cache[key]


# ---------------------------------------------------------------------------------------------
# 1. Reference (plain torch, readable, the oracle; plain autograd)
# ---------------------------------------------------------------------------------------------
def _attend(q, k, v, allowed, scale):
    """Softmax attention of q [M, Hq, D] over k, v [K, Hkv, D] where allowed [M, K]:
    (o [M, Hq, D], lse [M, Hq]). repeat_kv: query head h reads KV head h // (Hq / Hkv)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    s = torch.einsum("mhd,khd->hmk", q, k) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    o = torch.einsum("hmk,khd->mhd", torch.softmax(s, -1), v)
    return o, lse.T


def group_attention_reference(q, k, v, layout, scale=None, return_lse=False):
    """o [N, Hq, D] in q.dtype (and lse [N, Hq] when return_lse); see group_attention."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    seg, group_seg = layout.seg_cu.tolist(), layout.group_seg.tolist()
    outs, lses = [], []
    for g in range(layout.G):
        first, last = group_seg[g], group_seg[g + 1]
        ps, pe = seg[first], seg[first + 1]
        P = pe - ps
        causal = torch.ones(P, P, dtype=torch.bool, device=q.device).tril()
        o, lse = _attend(qf[ps:pe], kf[ps:pe], vf[ps:pe], causal, scale)  # the prompt
        outs.append(o)
        lses.append(lse)
        for s in range(first + 1, last):  # each response: [whole prompt, own earlier tokens]
            rs, re = seg[s], seg[s + 1]
            R = re - rs
            allowed = torch.cat([torch.ones(R, P, dtype=torch.bool, device=q.device),
                                 torch.ones(R, R, dtype=torch.bool, device=q.device).tril()], 1)
            keys = torch.cat([kf[ps:pe], kf[rs:re]]), torch.cat([vf[ps:pe], vf[rs:re]])
            o, lse = _attend(qf[rs:re], *keys, allowed, scale)
            outs.append(o)
            lses.append(lse)
    o = torch.cat(outs).to(q.dtype) if outs else q.new_empty(q.shape)
    lse = torch.cat(lses) if lses else q.new_empty(q.shape[:2], dtype=ct)
    return (o, lse) if return_lse else o


# ---------------------------------------------------------------------------------------------
# 2. Triton kernels. Query blocks tile each group from its start (a block never straddles two
#    groups, so every row of a block shares the group's prompt; it may straddle the prompt and
#    the first response, or two responses: per-row masks handle that). Aligning blocks to
#    segments instead would waste most of a block on short responses (direct-mode responses are
#    5 tokens); aligning to groups wastes at most one partial block per group.
#    Forward, program (query block, query head): the union of the block's rows' ranges is two
#    spans of keys, [min a_lo, max a_hi) and [min b_lo over rows with a B range, block end); one
#    online softmax (running max m, sum l, accumulator acc, in log2 units) runs over the tiles
#    of both, each score masked by its row's own ranges (visible(i, j) = j in A_i or j in B_i;
#    the second span starts where the first ends, so no key is counted twice). Stores o and
#    lse. dQ, program (query block, query head): the same spans, P recomputed from lse.
#    dK/dV, program (key block, KV head): k, v stay in registers; for each of the KV head's G
#    query heads, the query tiles of [block start, max q_hi) (all the queries that see a key of
#    the block), the same visibility masks transposed. delta = rowsum(dO * O) - dlse comes
#    from a small kernel over the N Hq rows first. No atomics: every output element is written
#    by exactly one program, so a call is deterministic.
# ---------------------------------------------------------------------------------------------
# (1 << 30 below: "no key": a b_lo past every row, i.e. an empty B range; group_layout keeps
# N < 2^30.)


@triton.jit
def _visible(qi, kj, a_lo, a_hi, b_lo):
    """Key position kj visible from query position qi (all broadcastable int tensors)."""
    return ((kj >= a_lo) & (kj < a_hi)) | ((kj >= b_lo) & (kj <= qi))


@triton.jit
def _load_ranges(a_lo_ptr, a_hi_ptr, b_lo_ptr, rows, ok):
    """Each row's ranges; rows outside the block get empty ones."""
    a_lo = tl.load(a_lo_ptr + rows, mask=ok, other=0)
    a_hi = tl.load(a_hi_ptr + rows, mask=ok, other=0)
    b_lo = tl.load(b_lo_ptr + rows, mask=ok, other=1 << 30)
    return a_lo, a_hi, b_lo


@triton.jit
def _key_spans(rows, ok, a_lo, a_hi, b_lo):
    """The block's two key spans [a_start, a_end) and [b_start, ...): together they cover every
    key a row of the block sees, and they do not overlap."""
    a_start = tl.min(tl.where(ok, a_lo, 1 << 30), axis=0)
    a_end = tl.max(a_hi, axis=0)
    b_start = tl.maximum(tl.min(tl.where(b_lo <= rows, b_lo, 1 << 30), axis=0), a_end)
    return a_start, a_end, b_start


@triton.jit
def _load_rows(ptr, rows64, ok, head, dd, d_ok, stride_t, stride_h, UPCAST: tl.constexpr):
    """[BLOCK, BLOCK_D] tile of rows `rows64` of head `head` (0 outside)."""
    x = tl.load(ptr + rows64[:, None] * stride_t + head * stride_h + dd[None, :],
                mask=ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter computes bf16 dots wrongly
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_cols(ptr, cols64, ok, head, dd, d_ok, stride_t, stride_h, UPCAST: tl.constexpr):
    """[BLOCK_D, BLOCK] tile (transposed) of rows `cols64` of head `head` (0 outside)."""
    x = tl.load(ptr + cols64[None, :] * stride_t + head * stride_h + dd[:, None],
                mask=d_ok[:, None] & ok[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _fwd_span(q, m, l, acc, k_ptr, v_ptr, kvh, lo, hi, rows, a_lo, a_hi, b_lo, qk_scale, dd,
              d_ok, stride_kt, stride_kh, stride_vt, stride_vh, BLOCK_N: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Continue the online softmax (m, l, acc) of the query tile q over keys lo .. hi-1."""
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        c_ok = cols < hi
        c64 = cols.to(tl.int64)  # N * Hkv * D may pass 2^31
        kt = _load_cols(k_ptr, c64, c_ok, kvh, dd, d_ok, stride_kt, stride_kh, UPCAST)
        v = _load_rows(v_ptr, c64, c_ok, kvh, dd, d_ok, stride_vt, stride_vh, UPCAST)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        vis = _visible(rows[:, None], cols[None, :], a_lo[:, None], a_hi[:, None],
                       b_lo[:, None]) & c_ok[None, :]
        s = tl.where(vis, s, float("-inf"))
        m, l, acc = online_softmax_step(m, l, acc, s, v, PRECISION)
    return m, l, acc


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, a_lo_ptr, a_hi_ptr, b_lo_ptr, blocks_ptr,
    D, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_lt,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    r0 = tl.load(blocks_ptr + 2 * pid)
    r1 = tl.load(blocks_ptr + 2 * pid + 1)  # an unused block: r0 = r1 = 0, nothing happens
    rows = r0 + tl.arange(0, BLOCK_M)
    ok = rows < r1
    rows64 = rows.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    a_lo, a_hi, b_lo = _load_ranges(a_lo_ptr, a_hi_ptr, b_lo_ptr, rows, ok)
    a_start, a_end, b_start = _key_spans(rows, ok, a_lo, a_hi, b_lo)

    q = _load_rows(q_ptr, rows64, ok, h, dd, d_ok, stride_qt, stride_qh, UPCAST)
    # Finite start: a fully masked tile then gives alpha = 1, p = 0 instead of NaN.
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m, l, acc = _fwd_span(q, m, l, acc, k_ptr, v_ptr, kvh, a_start, a_end, rows, a_lo, a_hi,
                          b_lo, qk_scale, dd, d_ok, stride_kt, stride_kh, stride_vt, stride_vh,
                          BLOCK_N, UPCAST, PRECISION)
    m, l, acc = _fwd_span(q, m, l, acc, k_ptr, v_ptr, kvh, b_start, r1, rows, a_lo, a_hi, b_lo,
                          qk_scale, dd, d_ok, stride_kt, stride_kh, stride_vt, stride_vh,
                          BLOCK_N, UPCAST, PRECISION)
    l_safe = tl.where(l > 0.0, l, 1.0)  # l = 0 only on rows outside the block
    o = acc / l_safe[:, None]
    tl.store(o_ptr + rows64[:, None] * stride_ot + h * stride_oh + dd[None, :],
             o.to(o_ptr.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + rows64 * stride_lt + h, (m + tl.log2(l_safe)) * 0.6931471805599453,
             mask=ok)


@triton.jit
def _dq_span(q, do, lse2, delta, dq, k_ptr, v_ptr, kvh, lo, hi, rows, a_lo, a_hi, b_lo,
             qk_scale, dd, d_ok, stride_kt, stride_kh, stride_vt, stride_vh,
             BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dq += dS k over keys lo .. hi-1 (dS in units of the natural-log scores / scale)."""
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        c_ok = cols < hi
        c64 = cols.to(tl.int64)
        kt = _load_cols(k_ptr, c64, c_ok, kvh, dd, d_ok, stride_kt, stride_kh, UPCAST)
        vt = _load_cols(v_ptr, c64, c_ok, kvh, dd, d_ok, stride_vt, stride_vh, UPCAST)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        vis = _visible(rows[:, None], cols[None, :], a_lo[:, None], a_hi[:, None],
                       b_lo[:, None]) & c_ok[None, :]
        p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, a_lo_ptr, a_hi_ptr, b_lo_ptr,
    blocks_ptr, D, scale, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_lt, stride_dqt, stride_dqh,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    r0 = tl.load(blocks_ptr + 2 * pid)
    r1 = tl.load(blocks_ptr + 2 * pid + 1)
    rows = r0 + tl.arange(0, BLOCK_M)
    ok = rows < r1
    rows64 = rows.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    a_lo, a_hi, b_lo = _load_ranges(a_lo_ptr, a_hi_ptr, b_lo_ptr, rows, ok)
    a_start, a_end, b_start = _key_spans(rows, ok, a_lo, a_hi, b_lo)

    q = _load_rows(q_ptr, rows64, ok, h, dd, d_ok, stride_qt, stride_qh, UPCAST)
    do = _load_rows(do_ptr, rows64, ok, h, dd, d_ok, stride_dot, stride_doh, UPCAST)
    lse2 = tl.load(lse_ptr + rows64 * stride_lt + h, mask=ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + rows64 * stride_lt + h, mask=ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_span(q, do, lse2, delta, dq, k_ptr, v_ptr, kvh, a_start, a_end, rows, a_lo, a_hi,
                  b_lo, qk_scale, dd, d_ok, stride_kt, stride_kh, stride_vt, stride_vh, BLOCK_N,
                  UPCAST, PRECISION)
    dq = _dq_span(q, do, lse2, delta, dq, k_ptr, v_ptr, kvh, b_start, r1, rows, a_lo, a_hi,
                  b_lo, qk_scale, dd, d_ok, stride_kt, stride_kh, stride_vt, stride_vh, BLOCK_N,
                  UPCAST, PRECISION)
    tl.store(dq_ptr + rows64[:, None] * stride_dqt + h * stride_dqh + dd[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])


@triton.jit
def _dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, a_lo_ptr, a_hi_ptr,
    b_lo_ptr, q_hi_ptr, blocks_ptr, D, scale, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_lt, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    c0 = tl.load(blocks_ptr + 2 * pid)
    c1 = tl.load(blocks_ptr + 2 * pid + 1)
    cols = c0 + tl.arange(0, BLOCK_N)  # this block's keys
    c_ok = cols < c1
    c64 = cols.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    # The queries that see a key of the block: [c0, max q_hi) (0 for an unused block).
    q_end = tl.max(tl.load(q_hi_ptr + cols, mask=c_ok, other=0), axis=0)
    k = _load_rows(k_ptr, c64, c_ok, kvh, dd, d_ok, stride_kt, stride_kh, UPCAST)
    v = _load_rows(v_ptr, c64, c_ok, kvh, dd, d_ok, stride_vt, stride_vh, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(G):  # the KV head's query heads: dK, dV sum over them
        h = kvh * G + g
        for i0 in range(c0, q_end, BLOCK_M):
            rows = i0 + tl.arange(0, BLOCK_M)
            r_ok = rows < q_end
            rows64 = rows.to(tl.int64)
            a_lo, a_hi, b_lo = _load_ranges(a_lo_ptr, a_hi_ptr, b_lo_ptr, rows, r_ok)
            q = _load_rows(q_ptr, rows64, r_ok, h, dd, d_ok, stride_qt, stride_qh, UPCAST)
            do = _load_rows(do_ptr, rows64, r_ok, h, dd, d_ok, stride_dot, stride_doh, UPCAST)
            lse2 = tl.load(lse_ptr + rows64 * stride_lt + h, mask=r_ok,
                           other=0.0) * 1.4426950408889634
            delta = tl.load(delta_ptr + rows64 * stride_lt + h, mask=r_ok, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [keys, queries]
            vis = _visible(rows[None, :], cols[:, None], a_lo[None, :], a_hi[None, :],
                           b_lo[None, :]) & c_ok[:, None]
            pt = tl.where(vis, tl.exp2(st - lse2[None, :]), 0.0)
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
    out_ok = c_ok[:, None] & d_ok[None, :]
    tl.store(dk_ptr + c64[:, None] * stride_dkt + kvh * stride_dkh + dd[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=out_ok)
    tl.store(dv_ptr + c64[:, None] * stride_dvt + kvh * stride_dvh + dd[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _delta_kernel(o_ptr, do_ptr, dlse_ptr, delta_ptr, R, D, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta = rowsum(dO * O) (- dlse) over the R = N * Hq rows of D elements, in float32."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    r64 = r.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    ok = r_ok[:, None] & (dd < D)[None, :]
    o = tl.load(o_ptr + r64[:, None] * D + dd[None, :], mask=ok, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + r64[:, None] * D + dd[None, :], mask=ok, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + r64, mask=r_ok, other=0.0)
    tl.store(delta_ptr + r64, delta, mask=r_ok)


# Tile sizes: (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) per kernel, input width and
# head-dim bucket (BLOCK_D <= 64, 128, 256). Not yet run on a GPU: chosen for sm_90 (H100/H200:
# 64K registers and 228 KB shared memory per SM) from FlashAttention-2's tile shapes, then cut
# until ptxas (Triton 3.6, sm_90a, cuobjdump --dump-resource-usage) reported no spills, or a few
# bytes: e.g. 16-bit, D = 128: forward 128 x 32 on 8 warps (255 registers, 8 B stack; 128 x 64
# spills 128 B), dQ 64 x 32 on 4 warps (40 B stack, the least of the shapes tried), dK/dV
# 64 keys x 32 queries on 8 warps (251 registers, no spill). A plain causal FlashAttention
# forward written the same way (pointer loads, no block pointers) also takes 254 registers at
# 128 x 64 x 128: the per-row masks cost little. fp32 inputs use ieee dots on the CUDA cores
# (no tf32: results match torch's default fp32 matmul) and need far smaller tiles. Speed is
# unmeasured: the tiles, warps and stages want an autotune sweep on the GPU.
_CONFIGS = {
    ("fwd", True, 64): (128, 64, 8, 3), ("fwd", True, 128): (128, 32, 8, 2),
    ("fwd", True, 256): (32, 32, 4, 2),
    ("dq", True, 64): (64, 64, 4, 1), ("dq", True, 128): (64, 32, 4, 1),
    ("dq", True, 256): (16, 32, 4, 1),
    ("dkdv", True, 64): (64, 64, 8, 1), ("dkdv", True, 128): (32, 64, 8, 1),
    ("dkdv", True, 256): (32, 32, 8, 2),
    ("fwd", False, 64): (32, 16, 4, 2), ("fwd", False, 128): (16, 16, 4, 1),
    ("fwd", False, 256): (16, 16, 4, 1),
    ("dq", False, 64): (32, 16, 4, 2), ("dq", False, 128): (16, 16, 4, 1),
    ("dq", False, 256): (16, 16, 4, 1),
    ("dkdv", False, 64): (16, 32, 4, 2), ("dkdv", False, 128): (16, 16, 4, 1),
    ("dkdv", False, 256): (16, 16, 4, 1),
}
_MAX_HEAD_DIM = 256


def _config(d, dtype, kind):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for kind in fwd, dq, dkdv; BLOCK_M
    counts queries and BLOCK_N keys in every kind. Under the interpreter: 16-token tiles, so
    that tests see several blocks and tiles per group."""
    block_d = max(16, triton.next_power_of_2(d))
    if INTERPRET:
        return 16, 16, block_d, 4, 1
    bm, bn, warps, stages = _CONFIGS[kind, dtype in (torch.float16, torch.bfloat16),
                                     max(64, block_d)]
    return bm, bn, block_d, warps, stages


def _kernel_dtype(t):
    """tl.dot takes fp32, fp16 and bf16; fp64 goes in as fp32."""
    return t.float() if t.dtype == torch.float64 else t


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _consts(d, dtype, kind):
    bm, bn, bd, warps, stages = _config(d, dtype, kind)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, UPCAST=INTERPRET, PRECISION="ieee",
                num_warps=warps, num_stages=stages)


def _triton_forward(q, k, v, layout, scale):
    N, Hq, D = q.shape
    G = Hq // k.shape[1]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # torch.empty: tests poison it
    lse = torch.empty(N, Hq, dtype=torch.float32, device=q.device)
    consts = _consts(D, q.dtype, "fwd")
    blocks = _blocks(layout, consts["BLOCK_M"], keys=False)
    _fwd_kernel[(blocks.shape[0], Hq)](
        q, k, v, o, lse, layout.a_lo, layout.a_hi, layout.b_lo, blocks, D, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), lse.stride(0), G=G, **consts)
    return o, lse


def _triton_delta(o, do, dlse):
    """delta [N, Hq] float32 = rowsum(dO * O) - dlse (o and do contiguous)."""
    N, Hq, D = o.shape
    delta = torch.empty(N, Hq, dtype=torch.float32, device=o.device)
    rows = N * Hq
    block_r, block_d = (16 if INTERPRET else 64), max(16, triton.next_power_of_2(D))
    has_dlse = dlse is not None
    dlse = dlse.float().contiguous() if has_dlse else delta  # never read without HAS_DLSE
    _delta_kernel[(triton.cdiv(rows, block_r),)](o, do, dlse, delta, rows, D, BLOCK_R=block_r,
                                                 BLOCK_D=block_d, HAS_DLSE=has_dlse)
    return delta


def _triton_backward(q, k, v, o, lse, do, dlse, layout, scale):
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    delta = _triton_delta(o, do, dlse)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    qk_scale = scale * _LOG2E
    consts = _consts(D, q.dtype, "dq")
    blocks = _blocks(layout, consts["BLOCK_M"], keys=False)
    _dq_kernel[(blocks.shape[0], Hq)](
        q, k, v, do, lse, delta, dq, layout.a_lo, layout.a_hi, layout.b_lo, blocks, D, scale,
        qk_scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), lse.stride(0), dq.stride(0), dq.stride(1), G=G, **consts)
    consts = _consts(D, q.dtype, "dkdv")
    blocks = _blocks(layout, consts["BLOCK_N"], keys=True)
    _dkdv_kernel[(blocks.shape[0], Hkv)](
        q, k, v, do, lse, delta, dk, dv, layout.a_lo, layout.a_hi, layout.b_lo, layout.q_hi,
        blocks, D, scale, qk_scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), do.stride(0), do.stride(1), lse.stride(0), dk.stride(0),
        dk.stride(1), dv.stride(0), dv.stride(1), G=G, **consts)
    return dq, dk, dv


class _TritonGroupAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale):
        dtype = q.dtype
        q, k, v = (_last_dim_contiguous(_kernel_dtype(t)) for t in (q, k, v))
        o, lse = _triton_forward(q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.scale, ctx.dtype = layout, scale, dtype
        ctx.set_materialize_grads(False)
        lse_out = lse.double() if dtype == torch.float64 else lse
        return o.to(dtype), lse_out

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        do = _kernel_dtype(do).to(o.dtype).contiguous()
        dq, dk, dv = _triton_backward(q, k, v, o, lse, do, dlse, ctx.layout, ctx.scale)
        return dq.to(ctx.dtype), dk.to(ctx.dtype), dv.to(ctx.dtype), None, None


# ---------------------------------------------------------------------------------------------
# 3a. The memory-lean CPU path: the same blocking as the kernels in torch (chunks of query rows
#     that tile each group, two key spans per chunk, per-row visibility masks), forward and a
#     recomputing backward; saves q, k, v, o, lse only. Each chunk's scores are at most
#     _CHUNK_ELEMS elements (float32: 16 MiB; the backward holds ~4 such buffers at a time).
# ---------------------------------------------------------------------------------------------
_CHUNK_ELEMS = 1 << 22
_CHUNK_ROWS = 128


def _chunks(layout, heads, chunk_elems):
    """[(c0, c1, a0, a1, b0)]: query rows c0..c1-1 (one group) see keys in [a0, a1) and
    [b0, c1) (the kernels' two spans). Rows per chunk: up to _CHUNK_ROWS, fewer where the keys
    are many. Cached on the layout (every layer of a step reuses it)."""
    key = ("chunks", heads, chunk_elems, _CHUNK_ROWS)
    if key in layout._cache:
        return layout._cache[key]
    group_cu = layout.group_cu.tolist()
    a_lo, a_hi, b_lo = layout.a_lo.tolist(), layout.a_hi.tolist(), layout.b_lo.tolist()
    out = []
    for g in range(layout.G):
        gs, ge = group_cu[g], group_cu[g + 1]
        c0 = gs
        while c0 < ge:
            rows = _CHUNK_ROWS
            while True:  # shrink until the scores fit (the key span grows with the rows)
                c1 = min(c0 + rows, ge)
                a0, a1 = min(a_lo[c0:c1]), max(a_hi[c0:c1])
                b0 = max(min((b for t, b in zip(range(c0, c1), b_lo[c0:c1]) if b <= t),
                             default=c1), a1)
                keys = (a1 - a0) + max(c1 - b0, 0)
                if rows == 1 or (c1 - c0) * keys * heads <= chunk_elems:
                    break
                rows //= 2
            out.append((c0, c1, a0, a1, b0))
            c0 = c1
    layout._cache[key] = out
    return out


def _chunk_scores(qc, kc, rows, keys, lo, hi, blo, scale):
    """Masked scores [Hkv, G, C, K] of the chunk's queries qc [C, Hkv, G, D] and keys
    kc [K, Hkv, D] at positions `keys`."""
    s = torch.einsum("chgd,khd->hgck", qc, kc) * scale
    vis = (((keys[None] >= lo[:, None]) & (keys[None] < hi[:, None]))
           | ((keys[None] >= blo[:, None]) & (keys[None] <= rows[:, None])))
    return s.masked_fill(~vis, float("-inf"))


def _chunk_keys(x, a0, a1, b0, c1):
    return torch.cat([x[a0:a1], x[b0:c1]]) if b0 < c1 else x[a0:a1]


def _chunk_positions(a0, a1, b0, c1, device):
    return torch.cat([torch.arange(a0, a1, device=device), torch.arange(b0, max(b0, c1),
                                                                         device=device)])


def _chunked_forward(q, k, v, layout, scale, chunks):
    """o [N, Hq, D] in the compute dtype, lse [N, Hq] (q, k, v already in it)."""
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(N, Hq, dtype=q.dtype, device=q.device)
    for c0, c1, a0, a1, b0 in chunks:
        rows = torch.arange(c0, c1, device=q.device)
        keys = _chunk_positions(a0, a1, b0, c1, q.device)
        s = _chunk_scores(q[c0:c1].reshape(-1, Hkv, Hq // Hkv, D), _chunk_keys(k, a0, a1, b0, c1),
                          rows, keys, layout.a_lo[c0:c1], layout.a_hi[c0:c1],
                          layout.b_lo[c0:c1], scale)
        m = torch.logsumexp(s, -1, keepdim=True)  # [Hkv, G, C, 1]; every row sees a key
        p = torch.exp(s - m)
        o[c0:c1] = torch.einsum("hgck,khd->chgd", p, _chunk_keys(v, a0, a1, b0, c1)).reshape(
            -1, Hq, D)
        lse[c0:c1] = m[..., 0].permute(2, 0, 1).reshape(-1, Hq)
    return o, lse


def _chunked_backward(q, k, v, o, lse, do, dlse, layout, scale, chunks):
    N, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    delta = (do * o).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(delta.dtype)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for c0, c1, a0, a1, b0 in chunks:
        rows = torch.arange(c0, c1, device=q.device)
        keys = _chunk_positions(a0, a1, b0, c1, q.device)
        qc, doc = q[c0:c1].reshape(-1, Hkv, G, D), do[c0:c1].reshape(-1, Hkv, G, D)
        kc, vc = _chunk_keys(k, a0, a1, b0, c1), _chunk_keys(v, a0, a1, b0, c1)
        s = _chunk_scores(qc, kc, rows, keys, layout.a_lo[c0:c1], layout.a_hi[c0:c1],
                          layout.b_lo[c0:c1], scale)
        lse_c = lse[c0:c1].view(-1, Hkv, G).permute(1, 2, 0)[..., None]  # [Hkv, G, C, 1]
        p = torch.exp(s - lse_c)
        dp = torch.einsum("chgd,khd->hgck", doc, vc)
        ds = p * (dp - delta[c0:c1].view(-1, Hkv, G).permute(1, 2, 0)[..., None])
        dq[c0:c1] = (torch.einsum("hgck,khd->chgd", ds, kc) * scale).reshape(-1, Hq, D)
        dkc = torch.einsum("hgck,chgd->khd", ds, qc) * scale
        dvc = torch.einsum("hgck,chgd->khd", p, doc)
        na = a1 - a0
        dk[a0:a1] += dkc[:na]
        dv[a0:a1] += dvc[:na]
        if b0 < c1:
            dk[b0:c1] += dkc[na:]
            dv[b0:c1] += dvc[na:]
    return dq, dk, dv


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ChunkedGroupAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, chunk_elems):
        ct = _compute_dtype(q.dtype)
        chunks = _chunks(layout, q.shape[1], chunk_elems)
        qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
        o, lse = _chunked_forward(qf, kf, vf, layout, scale, chunks)
        out = o.to(q.dtype)
        # the inputs as given (no float32 copies of 16-bit inputs) and the output the caller
        # holds anyway (delta = rowsum(dO * O) from the rounded o, as FlashAttention does)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.chunks = layout, scale, chunks
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        ct = _compute_dtype(q.dtype)
        do = torch.zeros_like(o, dtype=ct) if do is None else do.to(ct)
        dq, dk, dv = _chunked_backward(q.to(ct), k.to(ct), v.to(ct), o.to(ct), lse, do, dlse,
                                       ctx.layout, ctx.scale, ctx.chunks)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _sdpa_group_attention(q, k, v, layout, scale):
    """o [N, Hq, D] on torch's fused attention: per group one causal call over its n
    sequences [prompt, response i] (responses right-padded: a query never sees a later pad),
    the prompt's outputs taken from the first. The prompt's queries rerun n times inside the
    attention alone (+n P^2/2 score work, nothing of it kept), and what is saved for the
    backward is q, k, v of those sequences and o: linear in the tokens."""
    seg, gseg = layout.seg_cu.tolist(), layout.group_seg.tolist()
    key = ("sdpa-index", layout.N)
    if key not in layout._cache:  # the gather index of each group, reused by every layer
        plan = []
        for g in range(layout.G):
            p0, p1 = seg[gseg[g]], seg[gseg[g] + 1]
            rs = [(seg[i], seg[i + 1]) for i in range(gseg[g] + 1, gseg[g + 1])] or [(p1, p1)]
            width = max(b - a for a, b in rs)
            idx = torch.tensor([list(range(p0, p1)) + list(range(a, b)) + [p0] * (width - b + a)
                                for a, b in rs], device=q.device)
            plan.append((idx, p1 - p0, rs))
        layout._cache[key] = plan
    out = []
    for idx, P, rs in layout._cache[key]:
        # (index_select: its backward is an index_add, not advanced indexing's sorting put)
        qs, ks, vs = (x.index_select(0, idx.flatten()).unflatten(0, idx.shape).transpose(1, 2)
                      for x in (q, k, v))  # [n, H, P + R, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                           enable_gqa=True).transpose(1, 2)
        out.append(o[0, :P])
        out += [o[i, P:P + b - a] for i, (a, b) in enumerate(rs) if b > a]
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# 3b. Checks and the public entry point
# ---------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, layout):
    """Shapes, dtypes and devices: no host sync."""
    if not isinstance(layout, GroupLayout):
        raise InvalidInputError(f"layout: expected a GroupLayout (from group_layout), got "
                                f"{type(layout).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.dtype not in _DTYPES:
            what = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidInputError(f"{name}: expected a float32/bfloat16/float16/float64 "
                                    f"[N, heads, D] tensor, got {what}")
    N, Hq, D = q.shape
    if k.shape[0] != N or k.shape[2] != D:
        raise InvalidInputError(f"k: expected [N={N}, Hkv, D={D}], got {list(k.shape)}")
    if v.shape != k.shape:
        raise InvalidInputError(f"v: expected the shape of k {list(k.shape)}, got "
                                f"{list(v.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise InvalidInputError(f"q has Hq={Hq} heads: expected a multiple of the Hkv={Hkv} KV "
                                "heads of k (query head h reads KV head h // (Hq / Hkv))")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise InvalidInputError(f"{name}: expected the dtype of q ({q.dtype}), got {t.dtype}")
    if layout.N != N:
        raise InvalidInputError(f"layout: built for N={layout.N} tokens, but q, k, v have "
                                f"N={N}")
    for name, t in (("k", k), ("v", v)) + tuple((f"layout.{f}", getattr(layout, f))
                                                 for f in _LAYOUT_TENSORS):
        if t.device != q.device:
            raise InvalidInputError(f"{name} is on {t.device} but q on {q.device} (move the "
                                    "layout with layout.to(device))")
    for f in _LAYOUT_TENSORS:
        t = getattr(layout, f)
        if t.dtype != torch.int32 or t.dim() != 1 or not t.is_contiguous():
            raise InvalidInputError(f"layout.{f}: expected a contiguous int32 vector, got "
                                    f"{t.dtype} {list(t.shape)}")
    for f in ("a_lo", "a_hi", "b_lo", "q_hi"):
        if getattr(layout, f).shape[0] != N:
            raise InvalidInputError(f"layout.{f}: expected {N} entries (one per token), got "
                                    f"{getattr(layout, f).shape[0]}")
    if (layout.group_cu.shape[0] != layout.G + 1 or layout.group_seg.shape[0] != layout.G + 1
            or layout.seg_cu.shape[0] < layout.G + 1):
        raise InvalidInputError(f"layout.group_cu / layout.group_seg / layout.seg_cu: expected "
                                f"G + 1 = {layout.G + 1}, G + 1 and >= G + 1 entries, got "
                                f"{layout.group_cu.shape[0]} / {layout.group_seg.shape[0]} / "
                                f"{layout.seg_cu.shape[0]}")


def _check_layout(layout):
    """The layout's values, in one host transfer: the offsets are valid and the per-token ranges
    are the ones they imply (the kernels trust both: wrong ones read out of bounds)."""
    seg, gseg, N = layout.seg_cu.long(), layout.group_seg.long(), layout.N
    S = seg.shape[0] - 1
    offsets_ok = torch.stack([
        (seg[0] == 0) & (seg[-1] == N) & (S >= layout.G), (seg[1:] > seg[:-1]).all(),
        (gseg[0] == 0) & (gseg[-1] == S), (gseg[1:] > gseg[:-1]).all()]).all()
    # the ranges the offsets imply (computed in bounds whatever the offsets hold), compared
    want = _descriptors(seg, gseg, N)
    have = [layout.a_lo, layout.a_hi, layout.b_lo, layout.q_hi, layout.group_cu]
    flags = torch.stack([offsets_ok] + [(a == b).all() for a, b in zip(have, want)]).tolist()
    if not flags[0]:
        raise InvalidInputError(f"layout.seg_cu / layout.group_seg: expected segment offsets "
                                f"from 0 to N={N}, every segment >= 1 token, and every group "
                                f"one or more segments (build the layout with group_layout)")
    names = ("a_lo", "a_hi", "b_lo", "q_hi", "group_cu")
    for name, ok, a, b in zip(names, flags[1:], have, want):
        if not ok:
            t = torch.nonzero(a != b)[0].item()
            raise InvalidInputError(f"layout.{name}[{t}] = {a[t].item()}, expected {b[t].item()} "
                                    f"from seg_cu and group_seg (build the layout with "
                                    "group_layout; do not edit it in place)")


def group_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: GroupLayout,
                    scale: float | None = None, check: bool = True, return_lse: bool = False):
    """Attention over packed groups (prompt + n responses; see the module docstring),
    differentiable in q, k, v (and through lse when returned).

    q [N, Hq, D], k and v [N, Hkv, D] (fp32, bf16, fp16; fp64 runs as fp32 on the Triton path
    and as fp64 on the CPU path), layout from group_layout(prompt_lens, response_lens) on the
    tensors' device (layout.to(device) moves one). Hq must be a multiple of Hkv (query head h
    reads KV head h // (Hq / Hkv)); scale defaults to 1/sqrt(D); D <= 256 on the Triton path.
    Returns o [N, Hq, D] in q.dtype, and with return_lse also lse [N, Hq] (float32; float64 for
    float64 inputs).

    Triton on CUDA tensors (and on CPU under TRITON_INTERPRET=1); on CPU otherwise torch's
    fused attention per group (_sdpa_group_attention), or, with return_lse, a chunked torch
    path whose backward recomputes the scores (both: memory linear in the tokens). Shapes are
    always checked. The layout's values, which the kernels trust, are checked on the first call
    with each layout object (one host sync; every layer of a step then reuses the result; a
    layout edited in place afterwards is not checked again); check=False skips that check.
    """
    _check_inputs(q, k, v, layout)
    if check and not layout._cache.get("checked"):
        _check_layout(layout)
        layout._cache["checked"] = True
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    if layout.N == 0:
        o = q * 0  # keeps the graph: backward gives empty gradients
        lse = q.new_zeros(q.shape[:2], dtype=_compute_dtype(q.dtype))
        return (o, lse) if return_lse else o
    if use_triton(q, k, v, layout.a_lo):
        if q.shape[2] > _MAX_HEAD_DIM:
            raise InvalidInputError(f"q: head dim D={q.shape[2]}, the Triton path takes D <= "
                                    f"{_MAX_HEAD_DIM}")
        o, lse = _TritonGroupAttention.apply(q, k, v, layout, scale)
    elif not return_lse:
        return _sdpa_group_attention(q, k, v, layout, scale)
    else:
        o, lse = _ChunkedGroupAttention.apply(q, k, v, layout, scale, _CHUNK_ELEMS)
    return (o, lse) if return_lse else o
