"""Residual quantization kernels: nearest-centroid assignment, multi-level encode, centroid
update (METHOD.md section 2, the building blocks of RQ-KMeans).

Distances are ||x||^2 - 2 x.c + ||c||^2 (+ an optional per-centroid bias, the prices of the
balanced assignment), accumulated in float32 whatever the input dtype. The Triton kernels tile
N x K and loop over D, so the N x K distance matrix never exists in memory; ties go to the
lowest centroid index, as torch.argmin does.
"""
import torch
import triton
import triton.language as tl

from gream_fast.errors import InvalidInputError
from gream_fast.kernels._backend import INTERPRET, use_triton

__all__ = ["assign", "assign_reference", "encode", "encode_reference", "centroid_update",
           "centroid_update_reference"]

_CHUNK = 1 << 16  # reference rows per block: bounds its N x K scratch


# ---------------------------------------------------------------------------------------------
# 1. References (plain torch)
# ---------------------------------------------------------------------------------------------
def assign_reference(x, c, bias=None):
    """(index int64 [N], squared distance float32 [N]) of each row's nearest centroid; with
    `bias` [K] the argmin is of distance + bias and the value returned includes it."""
    c = c.float()
    cn = (c * c).sum(1) + (0 if bias is None else bias.float())
    idx = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    val = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], _CHUNK):
        xs = x[s:s + _CHUNK].float()
        d = cn[None, :] - 2 * xs @ c.T
        v, i = d.min(1)
        idx[s:s + _CHUNK], val[s:s + _CHUNK] = i, v + (xs * xs).sum(1)
    return idx, val


def encode_reference(x, codebooks):
    """Codes [N, L] (int64) and the final residual [N, D] (float32) of x under L codebooks
    [L, K, D]: at each level, nearest centroid, then subtract it."""
    r = x.float().clone()
    codes = torch.empty(x.shape[0], codebooks.shape[0], dtype=torch.int64, device=x.device)
    for level, cb in enumerate(codebooks):
        codes[:, level] = assign_reference(r, cb)[0]
        r -= cb.float()[codes[:, level]]
    return codes, r


def centroid_update_reference(x, a, k):
    """Per-cluster sums [K, D] and counts [K] (float32) of the rows of x assigned by a."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, a, x.float())
    counts = torch.bincount(a, minlength=k).float()
    return sums, counts


# ---------------------------------------------------------------------------------------------
# 2. Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _nearest(x_ptr, stride_x, rows, row_ok, c_ptr, stride_c, cn_ptr, K, D,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
             UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Nearest centroid of BLOCK_N rows: (index int32, ||c||^2 + bias - 2 x.c, no ||x||^2)."""
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_i = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            xt = tl.load(x_ptr + rows[:, None] * stride_x + dd[None, :],
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            ct = tl.load(c_ptr + cols[None, :] * stride_c + dd[:, None],  # [BLOCK_D, BLOCK_K]
                         mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter computes bf16 dots wrongly
                xt = xt.to(tl.float32)
                ct = ct.to(tl.float32)
            acc = tl.dot(xt, ct, acc, input_precision=PRECISION)
        cn = tl.load(cn_ptr + cols, mask=col_ok, other=float("inf"))
        dist = tl.where(col_ok[None, :], cn[None, :] - 2.0 * acc, float("inf"))
        m = tl.min(dist, axis=1)
        mi = tl.argmin(dist, axis=1).to(tl.int32) + k0
        better = m < best  # strict: an earlier block keeps ties
        best = tl.where(better, m, best)
        best_i = tl.where(better, mi, best_i)
    return best_i, best


@triton.jit
def _row_norms(x_ptr, stride_x, rows, row_ok, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    xn = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        xt = tl.load(x_ptr + rows[:, None] * stride_x + dd[None, :],
                     mask=row_ok[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
        xn += tl.sum(xt * xt, axis=1)
    return xn


@triton.jit
def _assign_kernel(x_ptr, c_ptr, cn_ptr, idx_ptr, val_ptr, N, K, D, stride_x, stride_c,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)  # N * D may pass 2^31
    best_i, best = _nearest(x_ptr, stride_x, rows, row_ok, c_ptr, stride_c, cn_ptr, K, D,
                            BLOCK_N, BLOCK_K, BLOCK_D, UPCAST, PRECISION)
    xn = _row_norms(x_ptr, stride_x, rows, row_ok, D, BLOCK_N, BLOCK_D)
    tl.store(idx_ptr + rows, best_i.to(tl.int64), mask=row_ok)
    tl.store(val_ptr + rows, best + xn, mask=row_ok)


@triton.jit
def _encode_kernel(r_ptr, cb_ptr, cn_ptr, codes_ptr, N, K, D, L, stride_r, stride_cb_level,
                   stride_c, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """All levels in one launch: r (float32, starts as x) is overwritten with the residual."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    for level in range(0, L):
        cb = cb_ptr + level * stride_cb_level
        best_i, _ = _nearest(r_ptr, stride_r, rows, row_ok, cb, stride_c, cn_ptr + level * K,
                             K, D, BLOCK_N, BLOCK_K, BLOCK_D, UPCAST, PRECISION)
        tl.store(codes_ptr + rows * L + level, best_i.to(tl.int64), mask=row_ok)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m = row_ok[:, None] & (dd < D)[None, :]
            ptrs = r_ptr + rows[:, None] * stride_r + dd[None, :]
            c = tl.load(cb + best_i[:, None].to(tl.int64) * stride_c + dd[None, :], mask=m,
                        other=0.0).to(tl.float32)
            tl.store(ptrs, tl.load(ptrs, mask=m, other=0.0) - c, mask=m)
        tl.debug_barrier()  # the next level reads what other threads of this program wrote


@triton.jit
def _centroid_update_kernel(x_ptr, a_ptr, sums_ptr, counts_ptr, N, D, stride_x,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    a = tl.load(a_ptr + rows, mask=row_ok, other=0)
    tl.atomic_add(counts_ptr + a, tl.where(row_ok, 1.0, 0.0), mask=row_ok)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (dd < D)[None, :]
        xt = tl.load(x_ptr + rows[:, None] * stride_x + dd[None, :], mask=m, other=0.0)
        tl.atomic_add(sums_ptr + a[:, None] * D + dd[None, :], xt.to(tl.float32), mask=m)


def _blocks(n, k, d):
    if INTERPRET:  # few, large programs: each costs ~ms in the interpreter
        return 64, 32, 32
    return 128, 64, 64


def _precision(x, allow_tf32):
    return "tf32" if (allow_tf32 and x.dtype == torch.float32) else "ieee"


def _kernel_dtype(t):
    """tl.dot takes fp32, fp16 and bf16; other float types (fp64) go in as fp32."""
    return t if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t.float()


def _norms(c, bias):
    cn = (c.float() * c.float()).sum(-1)
    return cn if bias is None else cn + bias.float()


# ---------------------------------------------------------------------------------------------
# 3. Public entry points
# ---------------------------------------------------------------------------------------------
def _check(x, c, what="c"):
    if x.dim() != 2 or c.dim() != 2 or x.shape[1] != c.shape[1]:
        raise InvalidInputError(f"x [N, D] and {what} [K, D] must agree in D: got "
                                f"{list(x.shape)} and {list(c.shape)}")
    if not (x.is_floating_point() and c.is_floating_point()):
        raise InvalidInputError(f"x and {what} must be floating point, got {x.dtype}, {c.dtype}")
    if c.shape[0] == 0:
        raise InvalidInputError(f"{what}: no centroids")
    if x.device != c.device:
        raise InvalidInputError(f"x is on {x.device} but {what} on {c.device}")


def assign(x: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None = None,
           allow_tf32: bool = False):
    """Nearest centroid of each row of x [N, D] among c [K, D]: (index int64 [N], squared
    distance float32 [N]); with bias [K], of distance + bias (the value includes the bias).
    allow_tf32 lets fp32 inputs use tf32 tensor cores on a GPU (3x faster, ~1e-3 relative
    error in the distances)."""
    _check(x, c)
    if bias is not None and bias.shape != (c.shape[0],):
        raise InvalidInputError(f"bias: expected shape [{c.shape[0]}], got {list(bias.shape)}")
    if not use_triton(x, c):
        return assign_reference(x, c, bias)
    x, c = _kernel_dtype(x).contiguous(), _kernel_dtype(c).contiguous()
    n, d = x.shape
    k = c.shape[0]
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    val = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return idx, val
    bn, bk, bd = _blocks(n, k, d)
    _assign_kernel[(triton.cdiv(n, bn),)](
        x, c, _norms(c, bias), idx, val, n, k, d, x.stride(0), c.stride(0),
        BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, UPCAST=INTERPRET or x.dtype != c.dtype,
        PRECISION=_precision(x, allow_tf32))
    return idx, val


def encode(x: torch.Tensor, codebooks: torch.Tensor, allow_tf32: bool = False):
    """Multi-level residual encode in one launch: (codes int64 [N, L], residual float32 [N, D])."""
    if codebooks.dim() != 3:
        raise InvalidInputError(f"codebooks: expected [L, K, D], got {list(codebooks.shape)}")
    _check(x, codebooks[0], "codebooks")
    if not use_triton(x, codebooks):
        return encode_reference(x, codebooks)
    r = x.float().contiguous().clone()
    cb = codebooks.float().contiguous()
    n, d = r.shape
    levels, k, _ = cb.shape
    codes = torch.empty(n, levels, dtype=torch.int64, device=x.device)
    if n == 0:
        return codes, r
    bn, bk, bd = _blocks(n, k, d)
    _encode_kernel[(triton.cdiv(n, bn),)](
        r, cb, _norms(cb, None).contiguous(), codes, n, k, d, levels, r.stride(0), cb.stride(0),
        cb.stride(1), BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, UPCAST=INTERPRET,
        PRECISION=_precision(r, allow_tf32))
    return codes, r


def centroid_update(x: torch.Tensor, a: torch.Tensor, k: int):
    """(sums float32 [K, D], counts float32 [K]) of the rows of x grouped by a (int [N] in
    [0, K)). On a GPU the sums are float32 atomics: their order, so the last bits, vary."""
    if x.dim() != 2 or not x.is_floating_point():
        raise InvalidInputError(f"x: expected a float [N, D] tensor, got {x.dtype} {list(x.shape)}")
    if a.shape != (x.shape[0],) or a.is_floating_point() or a.dtype == torch.bool:
        raise InvalidInputError(f"a: expected one integer cluster id per row ({x.shape[0]}), got "
                                f"{a.dtype} {list(a.shape)}")
    if a.numel():
        lo, hi = torch.stack([a.min(), a.max()]).tolist()  # ids out of range would write anywhere
        if lo < 0 or hi >= k:
            raise InvalidInputError(f"a: cluster ids must lie in 0..{k - 1}, got {lo}..{hi}")
    if not use_triton(x, a):
        return centroid_update_reference(x, a, k)
    x, a = _kernel_dtype(x).contiguous(), a.contiguous()
    n, d = x.shape
    sums = torch.zeros(k, d, dtype=torch.float32, device=x.device)
    counts = torch.zeros(k, dtype=torch.float32, device=x.device)
    if n:
        bn, _, bd = _blocks(n, k, d)
        _centroid_update_kernel[(triton.cdiv(n, bn),)](x, a, sums, counts, n, d, x.stride(0),
                                                       BLOCK_N=bn, BLOCK_D=bd)
    return sums, counts
