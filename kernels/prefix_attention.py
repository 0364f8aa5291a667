"""Decode attention with a shared prompt prefix (cascade attention), for beam search / sampling.

R rows (the beams or samples) are grouped by prompt: the rows of prompt b are the query rows
row_cu[b] .. row_cu[b+1]-1. Prompt b's KV is stored once, packed: prefix_k/v rows
prefix_cu[b] .. prefix_cu[b+1]-1. Each row r also has its own short suffix KV (the tokens it
generated, the current one included): suffix_k/v[r, :suffix_lens[r]]. Row r's single query
token attends to [its prompt's KV, then its suffix KV]; everything stored is in the past or is
the current token, so there is no causal mask. GQA: query head h reads KV head h // G,
G = Hq / Hkv (the Hugging Face repeat_kv convention). Scores s_j = scale * q.k_j, softmax in
float32, scale 1/sqrt(D) by default.

Softmax attention over a union of two key sets P (prompt) and S (suffix) splits exactly:
    LSE_A = log sum_{j in A} exp(s_j),   o_A = sum_{j in A} exp(s_j - LSE_A) v_j,
    LSE = log(exp(LSE_P) + exp(LSE_S)),  o = exp(LSE_P - LSE) o_P + exp(LSE_S - LSE) o_S.
So the prompt part is computed once per prompt for all of its rows and the suffix part per row.
The reference does just that (padded per prompt, then per row, then the merge). The Triton
kernel runs one online softmax (running max m, running sum l, accumulator acc) over the prompt
tiles and then over the row's suffix entries: continuing an online softmax over more keys is
the same LSE merge, done incrementally. When few (prompt, KV head) pairs would leave SMs idle,
the prompt part is split into chunks computed by separate programs whose partial states are then
merged the same way (flash-decoding; choose_splits).

A row with nothing to attend to (an empty prompt and an empty suffix: only reachable with
check=False, or through the reference) gets o = 0.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gream_fast.errors import InvalidInputError
from gream_fast.kernels._backend import INTERPRET, use_triton
from gream_fast.kernels._flash import online_softmax_step

__all__ = ["choose_splits", "cpu_plan", "shared_prefix_attention",
           "shared_prefix_attention_reference"]

_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# 1. Reference (plain torch, float32 inside)
# ---------------------------------------------------------------------------------------------
def _attend(s, ok, v, equation):
    """(LSE [...], softmax(s) @ v) over the keys where ok; LSE = -inf and output 0 where no key
    is valid."""
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, -1)
    w = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return lse, torch.einsum(equation, w, v)


def shared_prefix_attention_reference(q, prefix_k, prefix_v, prefix_cu, row_cu, suffix_k,
                                      suffix_v, suffix_lens, scale=None):
    """o [R, Hq, D] in q.dtype; see shared_prefix_attention."""
    R, Hq, D = q.shape
    Hkv, S = prefix_k.shape[1], suffix_k.shape[1]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    if R == 0:
        return q.new_empty(R, Hq, D)
    dev = q.device
    p_len = (prefix_cu[1:] - prefix_cu[:-1]).long()
    r_len = (row_cu[1:] - row_cu[:-1]).long()
    B = p_len.numel()

    # Prompt part, once per prompt for all its rows: pad prompts to [B, P] and their rows to
    # [B, Rm]. The masks enumerate (prompt, position) in packed order, so a masked assignment
    # scatters the packed tensors.
    p_ok = torch.arange(int(p_len.max()), device=dev) < p_len[:, None]  # [B, P]
    r_ok = torch.arange(int(r_len.max()), device=dev) < r_len[:, None]  # [B, Rm]
    kp = torch.zeros(B, p_ok.shape[1], Hkv, D, device=dev)
    vp = torch.zeros_like(kp)
    kp[p_ok], vp[p_ok] = prefix_k.float(), prefix_v.float()
    qr = q.float().view(R, Hkv, G, D)
    qp = torch.zeros(B, r_ok.shape[1], Hkv, G, D, device=dev)
    qp[r_ok] = qr
    s = torch.einsum("brhgd,bphd->brhgp", qp, kp) * scale
    lse_p, o_p = _attend(s, p_ok[:, None, None, None, :], vp, "brhgp,bphd->brhgd")
    lse_p, o_p = lse_p[r_ok], o_p[r_ok]  # back to rows: [R, Hkv, G], [R, Hkv, G, D]

    # Suffix part, per row.
    s = torch.einsum("rhgd,rshd->rhgs", qr, suffix_k.float()) * scale
    s_ok = torch.arange(S, device=dev) < suffix_lens.long()[:, None]  # [R, S]
    lse_s, o_s = _attend(s, s_ok[:, None, None, :], suffix_v.float(), "rhgs,rshd->rhgd")

    # Merge by log-sum-exp.
    lse = torch.logaddexp(lse_p, lse_s)
    lse = torch.where(torch.isinf(lse), 0.0, lse)[..., None]
    o = torch.exp(lse_p[..., None] - lse) * o_p + torch.exp(lse_s[..., None] - lse) * o_s
    return o.reshape(R, Hq, D).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# 2. Triton kernels. The main one: program (b, h, z) takes the rows of prompt b in blocks of
#    BLOCK_R (blocks z, z + Z, z + 2Z, ...) and, for each block, all G query heads of KV head h:
#    a [BLOCK_R*GP, D] tile of queries (lane i = row i // GP, head g = i % GP; GP is G rounded up
#    to a power of two, the extra lanes masked). It walks the prompt's KV in BLOCK_T tiles with
#    tl.dot (the prompt KV is read once per block of rows), then the rows' own suffixes, one
#    entry at a time for all rows of the block in a [BLOCK_R, GP, D] view (each row has its own
#    keys: multiply and sum instead of a dot; one K/V load per row serves its G heads), and
#    writes o.
#    Long prompts and few (prompt, KV head) pairs leave most SMs idle, so the prompt part can be
#    split (flash-decoding): _prefix_partial_kernel, program (b, h, z), runs the online softmax
#    over chunk z of prompt b's KV for all rows of the prompt and writes the partial (m, l, acc);
#    the main kernel with SPLIT then starts from the merge of the partials instead of the
#    prompt tiles, and goes on with the suffixes as before.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _load_queries(q_ptr, rows, heads, ok, dd, d_ok, stride_qr, stride_qh, UPCAST: tl.constexpr):
    q = tl.load(q_ptr + rows[:, None] * stride_qr + heads[:, None] * stride_qh + dd[None, :],
                mask=ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter computes bf16 dots wrongly
        q = q.to(tl.float32)
    return q


@triton.jit
def _attend_prompt(q, m, l, acc, pk_ptr, pv_ptr, h, t_start, t_end, qk_scale, dd, d_ok,
                   stride_pkt, stride_pkh, stride_pvt, stride_pvh, BLOCK_T: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Continue the online softmax (m, l, acc) of the query tile q over prompt KV rows
    t_start .. t_end-1 of KV head h; scores in log2 units (qk_scale = scale * log2(e))."""
    for t0 in range(t_start, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < t_end
        t64 = t.to(tl.int64)  # T * Hkv * D may pass 2^31
        kt = tl.load(pk_ptr + t64[None, :] * stride_pkt + h * stride_pkh + dd[:, None],
                     mask=d_ok[:, None] & t_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_T]
        v = tl.load(pv_ptr + t64[:, None] * stride_pvt + h * stride_pvh + dd[None, :],
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_T, BLOCK_D]
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m, l, acc = online_softmax_step(m, l, acc, s, v, PRECISION)
    return m, l, acc


@triton.jit
def _merge_partials(m, l, acc, pm_ptr, pl_ptr, pacc_ptr, num_splits, rows, heads, ok, dd, d_ok,
                    stride_ms, stride_mr, stride_as, stride_ar, stride_ah):
    """Fold the partial (m, l, acc) of every split into the running online softmax: the same
    LSE merge as one more tile, with the partial's own max."""
    m_at = pm_ptr + rows * stride_mr + heads
    l_at = pl_ptr + rows * stride_mr + heads
    a_at = pacc_ptr + rows[:, None] * stride_ar + heads[:, None] * stride_ah + dd[None, :]
    a_ok = ok[:, None] & d_ok[None, :]
    for z in range(0, num_splits):
        mz = tl.load(m_at + z * stride_ms, mask=ok, other=-1.0e30)
        lz = tl.load(l_at + z * stride_ms, mask=ok, other=0.0)
        az = tl.load(a_at + z * stride_as, mask=a_ok, other=0.0)
        m_new = tl.maximum(m, mz)
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(mz - m_new)
        l = l * alpha + lz * beta
        acc = acc * alpha[:, None] + az * beta[:, None]
        m = m_new
    return m, l, acc


@triton.jit
def _prefix_partial_kernel(
    q_ptr, pk_ptr, pv_ptr, prefix_cu_ptr, row_cu_ptr, pm_ptr, pl_ptr, pacc_ptr,
    D, qk_scale,
    stride_qr, stride_qh, stride_pkt, stride_pkh, stride_pvt, stride_pvh,
    stride_ms, stride_mr, stride_as, stride_ar, stride_ah,
    G: tl.constexpr, GP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    z = tl.program_id(2)
    p_start = tl.load(prefix_cu_ptr + b)
    p_end = tl.load(prefix_cu_ptr + b + 1)
    # Whole tiles per chunk; the last chunks of a short prompt are empty and still write their
    # (m = -1e30, l = 0, acc = 0), which the merge weighs by 0.
    chunk = tl.cdiv(tl.cdiv(p_end - p_start, tl.num_programs(2)), BLOCK_T) * BLOCK_T
    c_start = tl.minimum(p_start + z * chunk, p_end)
    c_end = tl.minimum(c_start + chunk, p_end)
    r_start = tl.load(row_cu_ptr + b)
    r_end = tl.load(row_cu_ptr + b + 1)

    i = tl.arange(0, BLOCK_R * GP)
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    heads = h * G + i % GP
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = (r0 + i // GP).to(tl.int64)
        ok = (rows < r_end) & (i % GP < G)
        q = _load_queries(q_ptr, rows, heads, ok, dd, d_ok, stride_qr, stride_qh, UPCAST)
        m = tl.full([BLOCK_R * GP], -1.0e30, tl.float32)
        l = tl.zeros([BLOCK_R * GP], tl.float32)
        acc = tl.zeros([BLOCK_R * GP, BLOCK_D], tl.float32)
        m, l, acc = _attend_prompt(q, m, l, acc, pk_ptr, pv_ptr, h, c_start, c_end, qk_scale,
                                   dd, d_ok, stride_pkt, stride_pkh, stride_pvt, stride_pvh,
                                   BLOCK_T, UPCAST, PRECISION)
        tl.store(pm_ptr + z * stride_ms + rows * stride_mr + heads, m, mask=ok)
        tl.store(pl_ptr + z * stride_ms + rows * stride_mr + heads, l, mask=ok)
        tl.store(pacc_ptr + z * stride_as + rows[:, None] * stride_ar
                 + heads[:, None] * stride_ah + dd[None, :], acc,
                 mask=ok[:, None] & d_ok[None, :])


@triton.jit
def _prefix_attention_kernel(
    q_ptr, pk_ptr, pv_ptr, prefix_cu_ptr, row_cu_ptr, sk_ptr, sv_ptr, slen_ptr, o_ptr,
    pm_ptr, pl_ptr, pacc_ptr, num_splits,
    D, qk_scale,
    stride_qr, stride_qh, stride_pkt, stride_pkh, stride_pvt, stride_pvh,
    stride_skr, stride_sks, stride_skh, stride_svr, stride_svs, stride_svh,
    stride_or, stride_oh, stride_ms, stride_mr, stride_as, stride_ar, stride_ah,
    G: tl.constexpr, GP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    p_start = tl.load(prefix_cu_ptr + b)
    p_end = tl.load(prefix_cu_ptr + b + 1)
    r_first = tl.load(row_cu_ptr + b) + tl.program_id(2) * BLOCK_R
    r_end = tl.load(row_cu_ptr + b + 1)
    r_step = tl.num_programs(2) * BLOCK_R

    i = tl.arange(0, BLOCK_R * GP)  # flat lanes, for the prompt part
    g = tl.arange(0, GP)  # [BLOCK_R, GP] view, for the suffix part and the output
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    heads = h * G + i % GP
    for r0 in range(r_first, r_end, r_step):
        rows = (r0 + i // GP).to(tl.int64)  # R * S * Hkv * D may pass 2^31
        ok = (rows < r_end) & (i % GP < G)
        q = _load_queries(q_ptr, rows, heads, ok, dd, d_ok, stride_qr, stride_qh, UPCAST)
        # Finite start: a fully masked tile then gives alpha = 1, p = 0 instead of NaN.
        m = tl.full([BLOCK_R * GP], -1.0e30, tl.float32)
        l = tl.zeros([BLOCK_R * GP], tl.float32)
        acc = tl.zeros([BLOCK_R * GP, BLOCK_D], tl.float32)
        if SPLIT:  # the prompt part was computed by _prefix_partial_kernel
            m, l, acc = _merge_partials(m, l, acc, pm_ptr, pl_ptr, pacc_ptr, num_splits, rows,
                                        heads, ok, dd, d_ok, stride_ms, stride_mr, stride_as,
                                        stride_ar, stride_ah)
        else:
            m, l, acc = _attend_prompt(q, m, l, acc, pk_ptr, pv_ptr, h, p_start, p_end, qk_scale,
                                       dd, d_ok, stride_pkt, stride_pkh, stride_pvt, stride_pvh,
                                       BLOCK_T, UPCAST, PRECISION)

        # The rows' own suffixes, continuing the same online softmax: that is the LSE merge of
        # the prompt part and the suffix part, done one key at a time.
        rr = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        r_ok = rr < r_end
        slen = tl.load(slen_ptr + rr, mask=r_ok, other=0)
        qs = tl.reshape(q.to(tl.float32) * qk_scale, [BLOCK_R, GP, BLOCK_D])
        acc3 = tl.reshape(acc, [BLOCK_R, GP, BLOCK_D])
        m2 = tl.reshape(m, [BLOCK_R, GP])
        l2 = tl.reshape(l, [BLOCK_R, GP])
        sk_row = sk_ptr + rr[:, None] * stride_skr + h * stride_skh + dd[None, :]
        sv_row = sv_ptr + rr[:, None] * stride_svr + h * stride_svh + dd[None, :]
        for j in range(0, tl.max(slen, axis=0)):
            on = j < slen
            kv_mask = on[:, None] & d_ok[None, :]
            kj = tl.load(sk_row + j * stride_sks, mask=kv_mask, other=0.0).to(tl.float32)
            vj = tl.load(sv_row + j * stride_svs, mask=kv_mask, other=0.0).to(tl.float32)
            sj = tl.where(on[:, None], tl.sum(qs * kj[:, None, :], axis=2), float("-inf"))
            m_new = tl.maximum(m2, sj)
            alpha = tl.exp2(m2 - m_new)
            p = tl.exp2(sj - m_new)
            l2 = l2 * alpha + p
            acc3 = acc3 * alpha[:, :, None] + p[:, :, None] * vj[:, None, :]
            m2 = m_new

        o = acc3 / tl.where(l2 > 0.0, l2, 1.0)[:, :, None]  # l = 0: nothing attended, acc = 0
        o_ok = (r_ok[:, None] & (g < G)[None, :])[:, :, None] & d_ok[None, None, :]
        tl.store(o_ptr + rr[:, None, None] * stride_or + (h * G + g)[None, :, None] * stride_oh
                 + dd[None, None, :], o.to(o_ptr.dtype.element_ty), mask=o_ok)


def _config(rows_per_prompt, gp, d, dtype):
    """(BLOCK_R, BLOCK_T, BLOCK_D, num_warps). The query tile has BLOCK_R * GP lanes: at least
    16 (tl.dot), no more rows than an average prompt has, and at most what fits in registers
    next to a D-wide accumulator (sm_90, checked with ptxas: 64 x 64 and 32 x 128 for 16-bit
    inputs on 8 warps; fp32, whose ieee dots run on the CUDA cores, 16 x 16-token tiles). Under
    the interpreter, at most 32 lanes and 16-token tiles, so that tests see several of each."""
    block_d = max(16, triton.next_power_of_2(d))
    if INTERPRET:
        lanes, block_t = 32, 16
    elif dtype == torch.float32:
        lanes, block_t = 16, 16
    else:
        lanes, block_t = max(16, min(64, 4096 // block_d)), 64
    block_r = min(max(triton.next_power_of_2(rows_per_prompt), 16 // gp, 1), max(lanes // gp, 1))
    return block_r, block_t, block_d, 8


def _kernel_dtype(t):
    """tl.dot takes fp32, fp16 and bf16; other float types (fp64) go in as fp32."""
    return t if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t.float()


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


# Splitting the prompt pays when it fills idle SMs: aim at 2 programs per SM, and give each split
# at least this many prompt tokens (below that, writing and merging the partials costs more than
# the parallelism saves). At most _MAX_SPLITS partials per row.
_MIN_SPLIT_TOKENS = 256
_MAX_SPLITS = 16


def choose_splits(prompts: int, kv_heads: int, prompt_tokens: int, row_programs: int,
                  sm_count: int) -> int:
    """How many chunks to split each prompt's KV into (1: no split), from shapes only, so that
    a captured CUDA graph sees the same grid at every replay. row_programs: the programs per
    (prompt, KV head) of the unsplit kernel."""
    target = 2 * sm_count
    if prompts * kv_heads * row_programs >= target:
        return 1
    by_length = (prompt_tokens // max(prompts, 1)) // _MIN_SPLIT_TOKENS  # an average prompt
    return max(1, min(triton.cdiv(target, prompts * kv_heads), by_length, _MAX_SPLITS))


_SM_COUNTS = {}


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: no automatic split (tests choose num_splits)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def _shared_prefix_attention_triton(q, prefix_k, prefix_v, prefix_cu, row_cu, suffix_k, suffix_v,
                                    suffix_lens, scale, num_splits=None):
    R, Hq, D = q.shape
    T, Hkv = prefix_k.shape[:2]
    B = prefix_cu.numel() - 1
    G = Hq // Hkv
    GP = triton.next_power_of_2(G)
    q, prefix_k, prefix_v, suffix_k, suffix_v = (
        _last_dim_contiguous(_kernel_dtype(t)) for t in (q, prefix_k, prefix_v, suffix_k, suffix_v))
    prefix_cu, row_cu, suffix_lens = (
        t.to(torch.int32).contiguous() for t in (prefix_cu, row_cu, suffix_lens))
    o = torch.empty(R, Hq, D, dtype=q.dtype, device=q.device)
    block_r, block_t, block_d, num_warps = _config(triton.cdiv(R, B), GP, D, q.dtype)
    # Enough programs per (prompt, KV head) for an average prompt's rows; a larger prompt's
    # extra blocks loop inside the programs. No host sync: R, B and T are shapes.
    row_programs = triton.cdiv(triton.cdiv(R, B), block_r)
    if num_splits is None:
        num_splits = choose_splits(B, Hkv, T, row_programs, _sm_count(q.device))
    consts = dict(G=G, GP=GP, BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_D=block_d,
                  UPCAST=INTERPRET,
                  PRECISION="ieee",  # fp32 inputs: exact fp32 dots, not tf32 (memory bound)
                  num_warps=num_warps)
    qk_scale = scale * _LOG2E
    if num_splits > 1:  # partial softmax state per (split, row, query head), float32
        part_m = torch.empty(num_splits, R, Hq, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(num_splits, R, Hq, D, dtype=torch.float32, device=q.device)
        _prefix_partial_kernel[(B, Hkv, num_splits)](
            q, prefix_k, prefix_v, prefix_cu, row_cu, part_m, part_l, part_acc, D, qk_scale,
            q.stride(0), q.stride(1), prefix_k.stride(0), prefix_k.stride(1),
            prefix_v.stride(0), prefix_v.stride(1), part_m.stride(0), part_m.stride(1),
            part_acc.stride(0), part_acc.stride(1), part_acc.stride(2), **consts)
    else:  # never read (SPLIT=False): any float32 tensor
        part_m = part_l = part_acc = o.new_empty(1, 1, 1, 1, dtype=torch.float32)
    _prefix_attention_kernel[(B, Hkv, row_programs)](
        q, prefix_k, prefix_v, prefix_cu, row_cu, suffix_k, suffix_v, suffix_lens, o,
        part_m, part_l, part_acc, num_splits, D, qk_scale,
        q.stride(0), q.stride(1), prefix_k.stride(0), prefix_k.stride(1),
        prefix_v.stride(0), prefix_v.stride(1),
        suffix_k.stride(0), suffix_k.stride(1), suffix_k.stride(2),
        suffix_v.stride(0), suffix_v.stride(1), suffix_v.stride(2),
        o.stride(0), o.stride(1), part_m.stride(0), part_m.stride(1),
        part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
        SPLIT=num_splits > 1, **consts)
    return o


# ---------------------------------------------------------------------------------------------
# 2b. The CPU path: the same split (prompt part per prompt, suffix part per row, LSE merge) on
#     torch's fused CPU attention, which returns each query's log-sum-exp (the op behind SDPA's
#     CPU flash backend; the reference runs where it is missing). The G query heads of a KV head
#     and the rows of a prompt are folded into the query length: no copy of K or V per head.
# ---------------------------------------------------------------------------------------------
_CPU_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass
class CPUPlan:
    """What the CPU path derives from the layout alone (offsets and lengths), once for all the
    layers of a decode step: cpu_plan()."""
    B: int
    Pm: int  # the longest prompt
    Rm: int  # the most rows of a prompt
    S: int  # the longest suffix (>= 1)
    p_ok: torch.Tensor | None  # [B, Pm] prompt positions that hold a token (None: all do)
    r_ok: torch.Tensor | None  # [B, Rm] row slots that hold a row (None: all do)
    s_ok: torch.Tensor | None  # [R, S] suffix entries that hold a token (None: all do)
    p_mask: torch.Tensor | None  # additive masks of the fused attention (None: no padding)
    s_mask: torch.Tensor | None
    prompt_empty: torch.Tensor | None  # [R] rows whose prompt is empty (check=False only)
    suffix_empty: torch.Tensor | None  # [R] rows whose suffix is empty


def cpu_plan(prefix_cu, row_cu, suffix_lens, dtype=torch.float32) -> CPUPlan:
    """The CPU path's view of a layout. A row with no key at all in a part (an empty prompt or
    suffix) sees every padding key there instead: finite values, weighed 0 in the merge."""
    dev, neg = prefix_cu.device, float("-inf")
    p_len = (prefix_cu[1:] - prefix_cu[:-1]).long()
    r_len = (row_cu[1:] - row_cu[:-1]).long()
    lens = suffix_lens.long()
    B, Pm, Rm = p_len.numel(), int(p_len.max()), int(r_len.max())
    S = max(int(lens.max()), 1) if lens.numel() else 1
    p_ok = torch.arange(Pm, device=dev) < p_len[:, None]
    r_ok = torch.arange(Rm, device=dev) < r_len[:, None]
    s_ok = torch.arange(S, device=dev) < lens[:, None]
    p_mask = s_mask = prompt_empty = suffix_empty = None
    if bool(p_ok.all()):
        p_ok = None
    else:
        p_mask = torch.where(p_ok | ~p_ok.any(1, keepdim=True), 0.0, neg).to(dtype)[:, None, None]
        prompt_empty = ~p_ok.any(1)[row_of(row_cu, len(lens))]
    if bool(r_ok.all()):
        r_ok = None
    if bool(s_ok.all()):
        s_ok = None
    else:
        s_mask = torch.where(s_ok | ~s_ok.any(1, keepdim=True), 0.0, neg).to(dtype)[:, None, None]
        suffix_empty = ~s_ok.any(1)
    return CPUPlan(B, Pm, Rm, S, p_ok, r_ok, s_ok, p_mask, s_mask, prompt_empty, suffix_empty)


def _shared_prefix_attention_cpu(q, prefix_k, prefix_v, prefix_cu, row_cu, suffix_k, suffix_v,
                                 suffix_lens, scale, plan: CPUPlan | None = None):
    R, Hq, D = q.shape
    Hkv = prefix_k.shape[1]
    G, neg = Hq // Hkv, float("-inf")
    pl = plan or cpu_plan(prefix_cu, row_cu, suffix_lens, q.dtype)
    B, Pm, Rm = pl.B, pl.Pm, pl.Rm
    # prompts padded to [B, Pm] and their rows to [B, Rm]; views when they are all as long
    # (n samples of equal prompts: no copy, no mask)
    if pl.p_ok is None:
        kp, vp = prefix_k.view(B, Pm, Hkv, D), prefix_v.view(B, Pm, Hkv, D)
    else:
        kp = prefix_k.new_zeros(B, Pm, Hkv, D)
        vp = torch.zeros_like(kp)
        kp[pl.p_ok], vp[pl.p_ok] = prefix_k, prefix_v
    if pl.r_ok is None:
        qp = q.view(B, Rm, Hkv, G, D)
    else:
        qp = q.new_zeros(B, Rm, Hkv, G, D)
        qp[pl.r_ok] = q.view(R, Hkv, G, D)
    qp = qp.permute(0, 2, 1, 3, 4).reshape(B, Hkv, Rm * G, D)
    o_p, lse_p = _CPU_ATTENTION(qp, kp.transpose(1, 2), vp.transpose(1, 2), 0.0, False,
                                attn_mask=pl.p_mask, scale=scale)
    o_p = o_p.view(B, Hkv, Rm, G, D).permute(0, 2, 1, 3, 4)  # [B, Rm, Hkv, G, D]
    lse_p = lse_p.view(B, Hkv, Rm, G).permute(0, 2, 1, 3)  # [B, Rm, Hkv, G]
    if pl.r_ok is None:
        o_p, lse_p = o_p.reshape(R, Hkv, G, D), lse_p.reshape(R, Hkv, G)
    else:
        o_p, lse_p = o_p[pl.r_ok], lse_p[pl.r_ok]
    # only the entries the rows hold: the longest suffix, and where rows differ in length the
    # others' unused entries zeroed (they may hold anything; the decode step's rows never differ)
    suffix_k, suffix_v = suffix_k[:, :pl.S], suffix_v[:, :pl.S]
    if pl.s_ok is not None:
        keep = pl.s_ok[:, :, None, None]
        suffix_k, suffix_v = torch.where(keep, suffix_k, 0), torch.where(keep, suffix_v, 0)
    o_s, lse_s = _CPU_ATTENTION(q.view(R, Hkv, G, D), suffix_k.transpose(1, 2),
                                suffix_v.transpose(1, 2), 0.0, False, attn_mask=pl.s_mask,
                                scale=scale)
    lse_p, lse_s = lse_p.float(), lse_s.float()
    empty = pl.suffix_empty is not None or pl.prompt_empty is not None
    if pl.suffix_empty is not None:
        lse_s = lse_s.masked_fill(pl.suffix_empty[:, None, None], neg)
    if pl.prompt_empty is not None:
        lse_p = lse_p.masked_fill(pl.prompt_empty[:, None, None], neg)
    lse = torch.logaddexp(lse_p, lse_s)
    if empty:
        lse = torch.where(torch.isinf(lse), 0.0, lse)  # no key at all: o = 0
    o = (torch.exp(lse_p - lse)[..., None] * o_p.float()
         + torch.exp(lse_s - lse)[..., None] * o_s.float())
    return o.reshape(R, Hq, D).to(q.dtype)


def row_of(row_cu, R):
    """The prompt of each row [R] from the row offsets [B + 1]."""
    return torch.repeat_interleave(torch.arange(row_cu.numel() - 1, device=row_cu.device),
                                   (row_cu[1:] - row_cu[:-1]).long(), output_size=R)


# ---------------------------------------------------------------------------------------------
# 3. Public entry point
# ---------------------------------------------------------------------------------------------
def _is_int(t):
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _check_shapes(q, prefix_k, prefix_v, prefix_cu, row_cu, suffix_k, suffix_v, suffix_lens):
    """Shapes, dtypes and devices: no host sync."""
    if q.dim() != 3 or not q.is_floating_point():
        raise InvalidInputError(f"q: expected a float [R, Hq, D] tensor, got {q.dtype} "
                                f"{list(q.shape)}")
    R, Hq, D = q.shape
    if prefix_k.dim() != 3 or prefix_k.shape[2] != D:
        raise InvalidInputError(f"prefix_k: expected [T, Hkv, D={D}], got {list(prefix_k.shape)}")
    T, Hkv, _ = prefix_k.shape
    if prefix_v.shape != prefix_k.shape:
        raise InvalidInputError(f"prefix_v: expected the shape of prefix_k {list(prefix_k.shape)}, "
                                f"got {list(prefix_v.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise InvalidInputError(f"q has Hq={Hq} heads: expected a multiple of the Hkv={Hkv} KV "
                                "heads of prefix_k (query head h reads KV head h // (Hq / Hkv))")
    if suffix_k.dim() != 4 or suffix_k.shape[0] != R or suffix_k.shape[2:] != (Hkv, D):
        raise InvalidInputError(f"suffix_k: expected [R={R}, S, Hkv={Hkv}, D={D}], got "
                                f"{list(suffix_k.shape)}")
    if suffix_v.shape != suffix_k.shape:
        raise InvalidInputError(f"suffix_v: expected the shape of suffix_k {list(suffix_k.shape)}, "
                                f"got {list(suffix_v.shape)}")
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v), ("suffix_k", suffix_k),
                    ("suffix_v", suffix_v)):
        if t.dtype != q.dtype:
            raise InvalidInputError(f"{name}: expected the dtype of q ({q.dtype}), got {t.dtype}")
    if prefix_cu.dim() != 1 or prefix_cu.numel() < 1 or not _is_int(prefix_cu):
        raise InvalidInputError(f"prefix_cu: expected an integer [B+1] tensor, got "
                                f"{prefix_cu.dtype} {list(prefix_cu.shape)}")
    if row_cu.shape != prefix_cu.shape or not _is_int(row_cu):
        raise InvalidInputError(f"row_cu: expected an integer tensor of the shape of prefix_cu "
                                f"{list(prefix_cu.shape)} (one entry per prompt + 1), got "
                                f"{row_cu.dtype} {list(row_cu.shape)}")
    if suffix_lens.shape != (R,) or not _is_int(suffix_lens):
        raise InvalidInputError(f"suffix_lens: expected an integer [R={R}] tensor, got "
                                f"{suffix_lens.dtype} {list(suffix_lens.shape)}")
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v), ("prefix_cu", prefix_cu),
                    ("row_cu", row_cu), ("suffix_k", suffix_k), ("suffix_v", suffix_v),
                    ("suffix_lens", suffix_lens)):
        if t.device != q.device:
            raise InvalidInputError(f"{name} is on {t.device} but q on {q.device}")


def _check_values(q, prefix_k, prefix_cu, row_cu, suffix_k, suffix_lens):
    """The offsets and lengths, in one host transfer; details worked out only on failure."""
    R, T, S = q.shape[0], prefix_k.shape[0], suffix_k.shape[1]
    pcu, rcu, slen = prefix_cu.long(), row_cu.long(), suffix_lens.long()
    p_ends, p_steps, r_ends, r_steps, s_range = torch.stack([
        (pcu[0] == 0) & (pcu[-1] == T), (pcu[1:] > pcu[:-1]).all(),
        (rcu[0] == 0) & (rcu[-1] == R), (rcu[1:] >= rcu[:-1]).all(),
        ((slen >= 0) & (slen <= S)).all()]).tolist()
    if not p_ends:
        raise InvalidInputError(f"prefix_cu: expected prefix_cu[0] = 0 and prefix_cu[-1] = T = {T} "
                                f"(the packed prompt tokens), got {pcu[0].item()} and "
                                f"{pcu[-1].item()}")
    if not p_steps:
        b = torch.nonzero(pcu[1:] <= pcu[:-1])[0].item()
        raise InvalidInputError(f"prefix_cu: every prompt needs at least one token, prompt {b} has "
                                f"{(pcu[b + 1] - pcu[b]).item()}")
    if not (r_ends and r_steps):
        raise InvalidInputError(f"row_cu: expected nondecreasing offsets from 0 to R = {R} (the "
                                f"rows of the prompts must cover all query rows), got "
                                f"{rcu.tolist() if rcu.numel() <= 20 else rcu}")
    if not s_range:
        raise InvalidInputError(f"suffix_lens: expected values in 0..S = {S} (the suffix "
                                f"capacity), got {slen.min().item()}..{slen.max().item()}")


def shared_prefix_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                            prefix_cu: torch.Tensor, row_cu: torch.Tensor, suffix_k: torch.Tensor,
                            suffix_v: torch.Tensor, suffix_lens: torch.Tensor,
                            scale: float | None = None, check: bool = True,
                            num_splits: int | None = None,
                            cpu_plan: "CPUPlan | None" = None) -> torch.Tensor:
    """One decode step of attention for rows that share their prompt's KV.

    q [R, Hq, D] (one query token per row); prefix_k, prefix_v [T, Hkv, D]: all prompts' KV
    packed, prompt b at rows prefix_cu[b] .. prefix_cu[b+1]-1 (prefix_cu int [B+1], starts at 0,
    every prompt >= 1 token); row_cu int [B+1]: the rows of prompt b are q rows
    row_cu[b] .. row_cu[b+1]-1 (a prompt may have no rows); suffix_k, suffix_v [R, S, Hkv, D]:
    each row's own KV, entries 0 .. suffix_lens[r]-1 valid (suffix_lens int [R], may be 0).
    All float tensors share q's dtype (fp32, bf16, fp16; fp64 runs as fp32). Hq must be a
    multiple of Hkv (query head h reads KV head h // (Hq / Hkv)); scale defaults to 1/sqrt(D).
    Returns o [R, Hq, D] in q.dtype.

    Backends: Triton on CUDA tensors (and under TRITON_INTERPRET=1); on CPU tensors torch's
    fused CPU attention with the LSE merge (_shared_prefix_attention_cpu), else the reference.
    Shapes are always checked; check=False skips the checks of the offsets and lengths (one
    host sync), which the kernel trusts: wrong ones read out of bounds. num_splits: into how
    many chunks the Triton path splits each prompt's KV (flash-decoding); default: chosen from
    the shapes and the SM count (choose_splits), 1 under the interpreter. cpu_plan: the CPU
    path's cpu_plan() of this layout, for callers that attend many layers over one layout.
    """
    _check_shapes(q, prefix_k, prefix_v, prefix_cu, row_cu, suffix_k, suffix_v, suffix_lens)
    if check:
        _check_values(q, prefix_k, prefix_cu, row_cu, suffix_k, suffix_lens)
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    if q.shape[0] == 0:
        return q.new_empty(q.shape)
    args = (q, prefix_k, prefix_v, prefix_cu, row_cu, suffix_k, suffix_v, suffix_lens)
    if not use_triton(*args):
        if _CPU_ATTENTION is not None and q.dtype in (torch.float32, torch.bfloat16):
            return _shared_prefix_attention_cpu(*args, scale, cpu_plan)
        return shared_prefix_attention_reference(*args, scale=scale)
    if num_splits is not None and num_splits < 1:
        raise InvalidInputError(f"num_splits: expected >= 1, got {num_splits}")
    return _shared_prefix_attention_triton(*args, scale, num_splits).to(q.dtype)
