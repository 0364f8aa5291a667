"""Bonus-calibrated group advantage (SRPO, METHOD.md section 5).

For each group of n rewards r (the responses to one prompt, contiguous in the batch):
    A_hat_i = (r_i - mean(r)) / (std(r) + eps)      std unbiased; a group of 1: mean 0, std 1
    c = #{r_i == 1}, rho = 1 - C(n-c, k) / C(n, k), sigma = sqrt(rho (1 - rho))
    b+ = (1 - rho) / (sigma + eps),  b- = (1 - rho - C(n-c-1, k-1) / C(n-1, k-1)) / (sigma + eps)
    A_i = A_hat_i + (b+ if r_i == 1 else b-)        no bonus for a group smaller than k
optionally broadcast over each response's tokens (times a 0/1 response mask).

Both the reference and the kernel subtract the group's first reward before summing: a group of
equal rewards then has a deviation of exactly 0 (not a rounding residue divided by eps), and the
variance does not lose digits to cancellation.
"""
import torch
import triton
import triton.language as tl

from gream_fast.errors import InvalidInputError
from gream_fast.kernels._backend import use_triton

__all__ = ["group_advantage", "group_advantage_reference"]


# ---------------------------------------------------------------------------------------------
# 1. Reference (plain torch, the oracle; float64 inside)
# ---------------------------------------------------------------------------------------------
def _binom_ratio(a: torch.Tensor, b: torch.Tensor, m: int) -> torch.Tensor:
    """C(a, m) / C(b, m) = prod (a - j) / prod (b - j); 0 where a < m (C(a, m) = 0 then).
    Where a >= m every factor of the denominator is >= 1; the clamp only keeps the discarded
    lanes free of 0/0."""
    num, den = torch.ones_like(a), torch.ones_like(a)
    for j in range(m):
        num, den = num * (a - j), den * (b - j).clamp(min=1)
    return torch.where(a < m, torch.zeros_like(a), num / den)


def group_advantage_reference(rewards, groups, k=4, eps=1e-6, response_mask=None):
    r = rewards.double()
    _, sizes = torch.unique_consecutive(groups, return_counts=True)
    seg = torch.repeat_interleave(torch.arange(sizes.numel(), device=r.device), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    n = sizes.double()

    d = r - r[starts][seg]  # shifted by the group's first reward
    mean_d = torch.zeros_like(n).index_add_(0, seg, d) / n
    dev = d - mean_d[seg]
    var = torch.zeros_like(n).index_add_(0, seg, dev * dev) / (n - 1).clamp(min=1)
    single = (sizes == 1)[seg]
    a_hat = torch.where(single, r, dev) / (torch.where(single, 1.0, var.sqrt()[seg]) + eps)

    exact = r == 1.0
    c = torch.zeros_like(n).index_add_(0, seg, exact.double())
    # No exact hit: rho = 0 and b- = 0 exactly. Computed, they are rounding residues divided
    # by sigma + eps ~ 1e-6, so they are set, not computed (the kernel does the same).
    none = c == 0
    rho = torch.where(none, 0.0, 1 - _binom_ratio(n - c, n, k)).clamp(0, 1)
    sigma = torch.sqrt(rho * (1 - rho))
    b_plus = (1 - rho) / (sigma + eps)
    b_minus = torch.where(none, 0.0, (1 - rho - _binom_ratio(n - c - 1, n - 1, k - 1)) / (sigma + eps))
    bonus = torch.where(exact, b_plus[seg], b_minus[seg])
    bonus = torch.where((sizes < k)[seg], 0.0, bonus)

    adv = (a_hat + bonus).float()
    if response_mask is None:
        return adv
    return adv[:, None] * (response_mask != 0)


# ---------------------------------------------------------------------------------------------
# 2. Triton kernel: one lane per response; each lane finds its group's bounds and reduces it.
#    No host-side segmentation, so no sync and one launch; the group is re-read per member
#    (O(n) loads each, all cache hits for the usual n <= 64). The optional token broadcast is
#    fused: at T tokens per response it is the only traffic that matters (R*T mask + output).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _binom_ratio_tl(a, b, M: tl.constexpr):
    # Products first, one division at the end: a single rounding of the (approximate on GPU)
    # division instead of M of them.
    num = tl.full(a.shape, 1.0, tl.float32)
    den = tl.full(a.shape, 1.0, tl.float32)
    for j in tl.static_range(M):
        num = num * (a - j)
        den = den * tl.maximum(b - j, 1.0)
    return tl.where(a < M, 0.0, num / den)


@triton.jit
def _group_advantage_kernel(
    rewards_ptr, groups_ptr, mask_ptr, out_ptr,
    R, T, stride_mask, stride_out, eps,
    K: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = rows < R
    g = tl.load(groups_ptr + rows, mask=valid, other=0)

    # Group bounds [start, end): step outwards while the neighbour carries the same group id.
    start = rows
    active = valid
    while tl.max(active.to(tl.int32), axis=0) > 0:
        ok = active & (start > 0)
        same = ok & (tl.load(groups_ptr + start - 1, mask=ok, other=0) == g)
        start = tl.where(same, start - 1, start)
        active = same
    end = rows + 1
    active = valid
    while tl.max(active.to(tl.int32), axis=0) > 0:
        ok = active & (end < R)
        same = ok & (tl.load(groups_ptr + end, mask=ok, other=0) == g)
        end = tl.where(same, end + 1, end)
        active = same
    n = end - start
    nf = n.to(tl.float32)
    longest = tl.max(tl.where(valid, n, 0), axis=0)

    r = tl.load(rewards_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    pivot = tl.load(rewards_ptr + start, mask=valid, other=0.0).to(tl.float32)
    sum_d = tl.zeros([BLOCK_R], tl.float32)
    c = tl.zeros([BLOCK_R], tl.float32)
    for j in range(0, longest):
        inside = valid & (j < n)
        rj = tl.load(rewards_ptr + start + j, mask=inside, other=0.0).to(tl.float32)
        sum_d += tl.where(inside, rj - pivot, 0.0)
        c += tl.where(inside & (rj == 1.0), 1.0, 0.0)
    mean_d = sum_d / nf
    sum_sq = tl.zeros([BLOCK_R], tl.float32)
    for j in range(0, longest):
        inside = valid & (j < n)
        rj = tl.load(rewards_ptr + start + j, mask=inside, other=0.0).to(tl.float32)
        dev_j = tl.where(inside, rj - pivot - mean_d, 0.0)
        sum_sq += dev_j * dev_j
    std = tl.sqrt(sum_sq / tl.maximum(nf - 1.0, 1.0))
    single = n == 1
    a_hat = tl.where(single, r, r - pivot - mean_d) / (tl.where(single, 1.0, std) + eps)

    none = c == 0.0  # rho = b- = 0 exactly: see the reference
    rho = tl.where(none, 0.0, 1.0 - _binom_ratio_tl(nf - c, nf, K))
    rho = tl.minimum(tl.maximum(rho, 0.0), 1.0)
    sigma = tl.sqrt(rho * (1.0 - rho))
    b_plus = (1.0 - rho) / (sigma + eps)
    b_minus = tl.where(none, 0.0,
                       (1.0 - rho - _binom_ratio_tl(nf - c - 1.0, nf - 1.0, K - 1)) / (sigma + eps))
    bonus = tl.where(r == 1.0, b_plus, b_minus)
    adv = a_hat + tl.where(n < K, 0.0, bonus)

    if HAS_MASK:
        rows64 = rows.to(tl.int64)  # R * T may pass 2^31 elements
        for t0 in range(0, T, BLOCK_T):
            cols = t0 + tl.arange(0, BLOCK_T)
            tile = valid[:, None] & (cols < T)[None, :]
            m = tl.load(mask_ptr + rows64[:, None] * stride_mask + cols[None, :], mask=tile, other=0)
            val = tl.where(m != 0, adv[:, None], 0.0)
            tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], val, mask=tile)
    else:
        tl.store(out_ptr + rows, adv, mask=valid)


def _group_advantage_triton(rewards, groups, k, eps, response_mask):
    R = rewards.numel()
    BLOCK_R = 128
    if response_mask is None:
        out = torch.empty(R, dtype=torch.float32, device=rewards.device)
        mask, T, stride_mask = out, 0, 0  # mask_ptr unused
    else:
        mask = response_mask if response_mask.stride(-1) == 1 else response_mask.contiguous()
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)  # same bytes; Triton loads it as 0/1
        T, stride_mask = mask.shape[1], mask.stride(0)
        out = torch.empty(R, T, dtype=torch.float32, device=rewards.device)
    grid = (triton.cdiv(R, BLOCK_R),)
    _group_advantage_kernel[grid](
        rewards, groups, mask, out, R, T, stride_mask, out.stride(0), eps,
        K=k, HAS_MASK=response_mask is not None, BLOCK_R=BLOCK_R, BLOCK_T=64,
    )
    return out


# ---------------------------------------------------------------------------------------------
# 3. Public entry point
# ---------------------------------------------------------------------------------------------
def _check(rewards, groups, k, response_mask):
    if rewards.dim() != 1 or not rewards.is_floating_point():
        raise InvalidInputError(
            f"rewards: expected a 1-D float tensor, got {rewards.dtype} of shape {list(rewards.shape)}")
    if groups.shape != rewards.shape or groups.is_floating_point() or groups.dtype == torch.bool:
        raise InvalidInputError(
            f"groups: expected an integer tensor of shape {list(rewards.shape)} (one group id per "
            f"response), got {groups.dtype} of shape {list(groups.shape)}")
    if groups.device != rewards.device:
        raise InvalidInputError(f"groups is on {groups.device} but rewards on {rewards.device}")
    if k < 1:
        raise InvalidInputError(f"k: expected a positive integer, got {k}")
    if rewards.numel() == 0:
        return
    if response_mask is not None and (
            response_mask.dim() != 2 or response_mask.shape[0] != rewards.shape[0]
            or response_mask.device != rewards.device):
        raise InvalidInputError(
            f"response_mask: expected shape [{rewards.shape[0]}, T] on {rewards.device}, got "
            f"{list(response_mask.shape)} on {response_mask.device}")
    # Both data checks come back in one transfer (torch.unique syncs on CUDA too); the details
    # are only worked out on failure.
    breaks = (groups[1:] != groups[:-1]).sum() + 1
    finite_ok, contiguous_ok = torch.stack(
        [torch.isfinite(rewards).all(), breaks == torch.unique(groups).numel()]).tolist()
    if not finite_ok:
        bad = torch.nonzero(~torch.isfinite(rewards))[0].item()
        raise InvalidInputError(f"rewards[{bad}] = {rewards[bad].item()}: rewards must be finite")
    if not contiguous_ok:
        g = groups.tolist()
        seen, prev = set(), None
        for i, x in enumerate(g):
            if x != prev and x in seen:
                raise InvalidInputError(
                    f"groups[{i}] = {x}: group {x} appeared earlier and was interrupted; the "
                    "responses of a group must be contiguous")
            seen.add(x)
            prev = x


def group_advantage(rewards: torch.Tensor, groups: torch.Tensor, k: int = 4, eps: float = 1e-6,
                    response_mask: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
    """Bonus-calibrated group advantages.

    rewards: float [R]; groups: int [R], the group id of each response (a group's responses are
    contiguous; groups may differ in size). Returns float32 [R], or [R, T] (the advantage on each
    response token, 0 where response_mask [R, T] is 0) when a mask is given.
    check=False skips the validation (one host sync) when the caller guarantees finite rewards
    and contiguous groups.
    """
    if check:
        _check(rewards, groups, k, response_mask)
    if rewards.numel() == 0:
        shape = (0,) if response_mask is None else tuple(response_mask.shape)
        return torch.zeros(shape, dtype=torch.float32, device=rewards.device)
    tensors = (rewards, groups) if response_mask is None else (rewards, groups, response_mask)
    if use_triton(*tensors):
        return _group_advantage_triton(rewards.contiguous(), groups.contiguous(), k, eps,
                                       response_mask)
    return group_advantage_reference(rewards, groups, k, eps, response_mask)
