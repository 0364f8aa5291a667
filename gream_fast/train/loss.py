"""Cross-entropy and per-token log-probs over a large vocabulary without [tokens, vocab]
logits for the whole batch. `token_logprobs` (SRPO's policy log-probs) is at the end; it shares
the chunking and precision helpers below.

`chunked_cross_entropy(hidden, lm_head_weight, labels)` equals
`F.cross_entropy(hidden @ lm_head_weight.T, labels, ignore_index=-100)` (value and gradients),
computed chunk by chunk over the rows that carry a label only (prompt tokens of SFT rows cost
nothing here).

Choice: a torch.autograd.Function that computes the gradients in its forward pass, chunk by chunk,
and keeps them (Liger-Kernel's fused linear cross-entropy works this way), rather than
torch.utils.checkpoint per chunk. Per chunk, the logits are needed once for the loss and once for
d loss / d logits = softmax - one_hot; doing both in the forward pass costs three matmuls per
chunk (logits, grad wrt hidden, grad wrt weight), where checkpointing costs four (the backward
recomputes the logits), and the loss is the end of the graph, so its backward only scales the
kept gradients by grad_output (1 for `loss.backward()`).

Memory, with C rows per chunk, V vocabulary rows, H hidden size, N rows of which n have labels:
  naive: logits [N, V] in float32, plus their gradient: 2 x N x V x 4 bytes (Qwen3-0.6B, 8k
    tokens: 2 x 8192 x 151936 x 4 = 9.9 GB).
  here: one chunk's logits / probabilities in float32 (C x V x 4, overwritten in place by the
    gradient) and their cast to the matmul dtype, plus the kept gradients: grad wrt hidden [N, H]
    (autograd would hold it anyway) and the float32 accumulator of grad wrt weight [V, H]
    (V x H x 4: 622 MB at Qwen3-0.6B; the optimizer needs a weight gradient of that size anyway).
  The default chunk keeps C x V at most 2^26 elements (256 MB of float32 logits: 443 rows at
  V=151936) and C at most 256 rows: longer chunks gain no speed, the product already reuses
  each weight row 256 times, and on the CPU shorter ones are faster (the [C, 128] x [128, 4096]
  product at 266 GFLOP/s for 256 rows, 194 for 1,024, on this repository's 2-core test machine:
  the logits stay nearer the core for the log-softmax).
Precision: the matmuls run in autocast's dtype when autocast is on (bfloat16 on GPU, as the LM
head would; the weight is cast once per call), else in the dtype of `hidden`; log-softmax and the
gradient of the logits in float32; the weight gradient accumulated over chunks in float32 (each
chunk's product rounded to the matmul dtype first).
"""
import torch

from gream_fast.errors import InvalidInputError

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 26  # default C x V at most
CHUNK_ROWS = 256  # and C at most
SAVED_PROBS = 1 << 24  # token_logprobs keeps the softmax for the backward up to M x V of this


def default_chunk(vocab: int) -> int:
    return max(16, min(CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab, 1)))


def matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    """autocast's dtype when it is on (as the LM head would run), else hidden's."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


def _chunk_logits(h, w, dtype) -> torch.Tensor:
    """[C, V] float32 logits of one chunk, the product in the matmul dtype."""
    return (h.to(dtype) @ w.T).float()


def _add_weight_grad(grad_w, g, h, dtype) -> None:
    """grad_w (float32) += g.T @ h, g and h in the matmul dtype."""
    if dtype == torch.float32:
        grad_w.addmm_(g.T, h)
    else:  # fp32 += bf16 in place: no float32 copy of the product
        grad_w += g.T @ h


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, scale, dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        rows = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)
        w = weight if weight.dtype == dtype else weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, rows.numel(), chunk):
                idx = rows[start:start + chunk]
                h, y = hidden.index_select(0, idx).to(dtype), labels.index_select(0, idx)
                # one fused log-softmax pass (not logsumexp's max, subtract, exp, sum, log)
                logp = torch.log_softmax(_chunk_logits(h, w, dtype), dim=1)  # [C, V]
                total -= logp.gather(1, y[:, None]).sum()
                if not (need_h or need_w):
                    continue
                # d/dlogits of scale * sum(-logp_y) = scale * (softmax - one_hot), in place (in
                # float32: p_y - 1 of a confident row would cancel in bfloat16)
                g = logp.exp_()
                g.scatter_add_(1, y[:, None], torch.full_like(g[:, :1], -1.0))
                g = g.mul_(scale).to(dtype)
                if need_h:
                    grad_h.index_copy_(0, idx, (g @ w).to(grad_h.dtype))
                if need_w:
                    _add_weight_grad(grad_w, g, h, dtype)
        ctx.save_for_backward(grad_h if need_h else None,
                              grad_w.to(weight.dtype) if need_w else None)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_out.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                          labels: torch.Tensor, chunk: int | None = None,
                          reduction: str = "mean", normalizer: float | None = None):
    """(loss, count): cross-entropy of `labels` under logits `hidden @ lm_head_weight.T`, over
    the positions whose label is not -100, and how many those are (an int).

    hidden [N, H] (or [..., H] with labels [...]); lm_head_weight [V, H]; chunk: rows per chunk
    (default: default_chunk). reduction "mean" divides the sum by the count (0 when the count is
    0), "sum" returns the sum; `normalizer`, when given, divides the sum by it instead (gradient
    accumulation: the token count of the whole optimizer step). Labels are used as given: shift
    them for next-token prediction before calling."""
    if hidden.shape[:-1] != labels.shape:
        raise InvalidInputError(f"chunked_cross_entropy: hidden {list(hidden.shape)} and labels "
                                f"{list(labels.shape)} must agree but for hidden's last dim")
    if lm_head_weight.ndim != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise InvalidInputError(f"chunked_cross_entropy: lm_head_weight {list(lm_head_weight.shape)}"
                                f": expected [vocab, {hidden.shape[-1]}]")
    if reduction not in ("mean", "sum"):
        raise InvalidInputError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(device=hidden.device, dtype=torch.long)
    vocab = lm_head_weight.shape[0]
    valid = labels != IGNORE_INDEX
    count = int(valid.sum())
    if count and bool(((labels < 0) & valid).any() or (labels >= vocab).any()):
        bad = labels[valid & ((labels < 0) | (labels >= vocab))][0]
        raise InvalidInputError(f"chunked_cross_entropy: label {int(bad)} outside the vocabulary "
                                f"0..{vocab - 1} (and not the ignore index -100)")
    chunk = chunk or default_chunk(vocab)
    if chunk < 1:
        raise InvalidInputError(f"chunk: expected >= 1, got {chunk}")
    if normalizer is not None:
        scale = 1.0 / normalizer if normalizer else 0.0
    elif reduction == "mean":
        scale = 1.0 / count if count else 0.0
    else:
        scale = 1.0
    return _ChunkedCE.apply(hidden, lm_head_weight, labels, chunk, scale,
                            matmul_dtype(hidden)), count


class _TokenLogprobs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T).gather(target), chunk by chunk, forward and backward.

    Unlike cross-entropy, these log-probs are not the end of the graph: the loss's gradient g
    [M] wrt them (the SRPO ratio, clip and KL) is known only once the whole vector exists, and
    the weight gradient sum_i g_i (onehot_i - p_i)^T h_i needs every row's softmax p_i (all V
    of it) scaled by g_i. So either the forward keeps P [M, V], or the backward recomputes each
    chunk's logits and softmax (4 matmuls per chunk instead of 3, C x V float32 at a time). A
    call of at most SAVED_PROBS elements (M x V: 64 MB of float32, a pack of a few thousand
    tokens over a small vocabulary) keeps P; a larger one recomputes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk, dtype):
        w = weight if weight.dtype == dtype else weight.to(dtype)
        out = torch.empty(len(target), dtype=torch.float32, device=hidden.device)
        keep = any(ctx.needs_input_grad[:2]) and len(target) * len(weight) <= SAVED_PROBS
        probs = []  # one tensor per chunk: no fresh M x V block to fault in
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, len(target), chunk):
                logp = torch.log_softmax(_chunk_logits(hidden[s:s + chunk], w, dtype), dim=1)
                out[s:s + chunk] = logp.gather(1, target[s:s + chunk, None]).squeeze(1)
                if keep:
                    probs.append(logp.exp_())
        ctx.save_for_backward(hidden, weight, target, *probs)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # (the kept softmax becomes the logits' gradient in place: a second backward through
        # a retained graph fails autograd's version check on it rather than going wrong)
        hidden, weight, target, *probs = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        chunk, dtype = ctx.chunk, ctx.dtype
        w = weight if weight.dtype == dtype else weight.to(dtype)
        grad_out = grad_out.float()
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, len(target), chunk):
                h, t = hidden[s:s + chunk].to(dtype), target[s:s + chunk]
                g_out = grad_out[s:s + chunk, None]
                # d(sum g * logp)/dlogits = g * (onehot - softmax), in float32
                g = probs[s // chunk] if probs else torch.softmax(_chunk_logits(h, w, dtype), 1)
                g.mul_(-g_out)
                g = g.scatter_add_(1, t[:, None], g_out).to(dtype)
                if need_h:
                    grad_h[s:s + chunk] = (g @ w).to(grad_h.dtype)
                if need_w:
                    _add_weight_grad(grad_w, g, h, dtype)
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                   chunk: int | None = None) -> torch.Tensor:
    """log_softmax(hidden @ weight.T, -1).gather(1, target[:, None]).squeeze(1), [M] float32,
    differentiable wrt hidden and weight, holding one chunk's [C, V] float32 logits at a time
    (see _TokenLogprobs for why its backward recomputes them). hidden [M, H]; weight [V, H] (the
    LM head, no bias); target [M] token ids; chunk: rows per chunk (default_chunk).
    Precision as chunked_cross_entropy: matmuls in autocast's dtype or hidden's, log-softmax in
    float32, the weight gradient accumulated in float32."""
    if hidden.ndim != 2 or target.ndim != 1 or len(target) != len(hidden):
        raise InvalidInputError(f"token_logprobs: hidden {list(hidden.shape)} and target "
                                f"{list(target.shape)}: expected [M, H] and [M]")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[1]:
        raise InvalidInputError(f"token_logprobs: weight {list(weight.shape)}: expected "
                                f"[vocab, {hidden.shape[1]}]")
    target = target.to(device=hidden.device, dtype=torch.long)
    vocab = weight.shape[0]
    if len(target) and bool(((target < 0) | (target >= vocab)).any()):
        bad = target[(target < 0) | (target >= vocab)][0]
        raise InvalidInputError(f"token_logprobs: target {int(bad)} outside the vocabulary "
                                f"0..{vocab - 1}")
    chunk = chunk or default_chunk(vocab)
    if chunk < 1:
        raise InvalidInputError(f"chunk: expected >= 1, got {chunk}")
    return _TokenLogprobs.apply(hidden, weight, target, chunk, matmul_dtype(hidden))
