"""Log-probs of response tokens over one SID level's rows of the LM head (SRPO's policy loss).

For rows n with hidden states h_n and the level's K rows W of the LM head (a slice: the level's
SID tokens are contiguous),

    z_n = W h_n  [K],   logp_n = z_n[t_n] - logsumexp(z_n)          (SID-slice normalisation)

and backward, with g_n = dL/dlogp_n,

    dz_n = g_n (onehot(t_n) - softmax(z_n)),   dh = dz W,   dW = dz^T h.

Only [N, K] logits exist (K = 256 codes, not a 152k vocabulary): the two matrix products run on
the tensor cores (torch), and the kernel fuses what lies between them: the row's log-sum-exp
and the gather in the forward, the softmax gradient in the backward (one read of z each, fp32).
Tokens are 0-based positions in the slice (token id - the level's first id).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gream_fast.errors import InvalidInputError
from gream_fast.kernels._backend import use_triton

__all__ = ["sid_logprob", "sid_logprob_reference"]


# ---------------------------------------------------------------------------------------------
# 1. Reference (plain torch, autograd does the backward)
# ---------------------------------------------------------------------------------------------
def sid_logprob_reference(hidden, weight, tokens):
    z = F.linear(hidden, weight).float()
    return torch.log_softmax(z, -1).gather(1, tokens.long()[:, None]).squeeze(1)


# ---------------------------------------------------------------------------------------------
# 2. Triton kernels: log-sum-exp + gather forward, softmax gradient backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _lse_gather_kernel(z_ptr, tok_ptr, logp_ptr, lse_ptr, N, K, stride_z,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_in = tl.minimum(rows, N - 1)  # past-the-end lanes recompute the last row (no -inf rows)
    tok = tl.load(tok_ptr + rows_in)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    picked = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = (rows_in >= 0)[:, None] & (cols < K)[None, :]
        z = tl.load(z_ptr + rows_in[:, None].to(tl.int64) * stride_z + cols[None, :], mask=ok,
                    other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
        picked += tl.sum(tl.where(cols[None, :] == tok[:, None], z, 0.0), 1)
    lse = m + tl.log(s)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(logp_ptr + rows, picked - lse, mask=row_ok)


@triton.jit
def _softmax_grad_kernel(z_ptr, tok_ptr, lse_ptr, g_ptr, dz_ptr, N, K, stride_z, stride_dz,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tok = tl.load(tok_ptr + rows, mask=row_ok, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols < K)[None, :]
        z = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_z + cols[None, :], mask=ok,
                    other=float("-inf")).to(tl.float32)
        dz = g[:, None] * (tl.where(cols[None, :] == tok[:, None], 1.0, 0.0)
                           - tl.exp(z - lse[:, None]))
        tl.store(dz_ptr + rows[:, None].to(tl.int64) * stride_dz + cols[None, :], dz, mask=ok)


def _blocks(k):
    return 16, min(256, triton.next_power_of_2(k))


def _lse_gather(z, tokens):
    n, k = z.shape
    logp = torch.empty(n, dtype=torch.float32, device=z.device)
    lse = torch.empty_like(logp)
    if n:
        bn, bk = _blocks(k)
        _lse_gather_kernel[(triton.cdiv(n, bn),)](z, tokens, logp, lse, n, k, z.stride(0),
                                                 BLOCK_N=bn, BLOCK_K=bk)
    return logp, lse


def _softmax_grad(z, tokens, lse, g):
    n, k = z.shape
    dz = torch.empty(n, k, dtype=torch.float32, device=z.device)
    if n:
        bn, bk = _blocks(k)
        _softmax_grad_kernel[(triton.cdiv(n, bn),)](z, tokens, lse, g, dz, n, k, z.stride(0),
                                                   dz.stride(0), BLOCK_N=bn, BLOCK_K=bk)
    return dz


class _SIDLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens):
        z = F.linear(hidden, weight).float().contiguous()
        logp, lse = _lse_gather(z, tokens)
        ctx.save_for_backward(hidden, weight, tokens, z, lse)
        return logp

    @staticmethod
    def backward(ctx, g):
        hidden, weight, tokens, z, lse = ctx.saved_tensors
        dz = _softmax_grad(z, tokens, lse, g.float().contiguous())
        dh = (dz @ weight.float()).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        dw = (dz.T @ hidden.float()).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None


# ---------------------------------------------------------------------------------------------
# 3. Public entry point
# ---------------------------------------------------------------------------------------------
def sid_logprob(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(hidden @ weight.T)[tokens] per row, float32 [N], differentiable in hidden and
    weight. hidden [N, H]; weight [K, H] (the level's rows of the LM head, e.g.
    lm_head.weight[start:start + K]: gradients flow into the full matrix); tokens [N] in
    0..K-1."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise InvalidInputError(f"hidden [N, H] and weight [K, H] must agree in H: got "
                                f"{list(hidden.shape)} and {list(weight.shape)}")
    if tokens.shape != (hidden.shape[0],) or tokens.is_floating_point():
        raise InvalidInputError(f"tokens: expected {hidden.shape[0]} integer positions in the "
                                f"slice, got {tokens.dtype} {list(tokens.shape)}")
    if not use_triton(hidden, weight, tokens):
        return sid_logprob_reference(hidden, weight, tokens)
    return _SIDLogProb.apply(hidden, weight, tokens.contiguous())
