"""Triton pieces shared by the attention kernels (prefix_attention, group_attention)."""
import triton
import triton.language as tl


@triton.jit
def online_softmax_step(m, l, acc, s, v, PRECISION: tl.constexpr):
    """One key tile of the online softmax: scores s [M, N] in log2 units (-inf where a key is
    not visible), values v [N, D]; the running max m [M], sum l [M] and output acc [M, D]
    rescaled to the new max, the tile's probabilities added. Returns (m, l, acc)."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l, acc
