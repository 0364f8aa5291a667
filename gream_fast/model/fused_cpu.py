"""Fused float32 CPU kernels for the decoder's RMSNorm and rotary embedding, forward and
backward, each one numba pass over its rows.

Why: on a CPU a small model's passes are bound by its elementwise ops as much as by its GEMMs.
Hugging Face's RMSNorm is 5 torch ops forward (pow, mean, add, rsqrt, two muls) and about twice
that in autograd's backward, each a full pass over the activations; its rotary embedding is 9
per tensor (two slices, neg, cat, two muls, add) and as many backward. Here each is one pass
that keeps a row in registers: RMSNorm saves only 1/rms per row for its backward, the rotary
embedding's backward is the rotation by -angle. (SiLU(gate) * up stays torch's: without SVML,
numba's exp is scalar and lost to torch's vectorised SiLU.)

Each kernel is compiled twice: parallel over rows for large inputs, serial for small ones (a
decode step's 128 rows), where waking the threads costs more than the work.

fused_ops(model) runs a Qwen3 / Qwen2 / Llama model's RMSNorm modules and its attention's rotary
embedding through these inside the block (forward, and the backward of what ran inside), for
float32 CPU tensors; any other tensor runs the model's own code. The runner's inference path
(model/runner.py) calls the same kernels. Numerics: float32 throughout, as HF's float32 path,
with sums in another order (differences ~1e-6 relative).
"""
import contextlib
import importlib
import types

import numba
import numpy as np
import torch
from numba import njit, prange

# reassociation lets the row sums vectorise; no assumption about NaN or infinities
_FAST = {"reassoc", "contract"}
_ONE = np.float32(1.0)
PARALLEL_MIN = 1 << 16  # elements from which a kernel runs on all threads


def _compiled(fn):
    """fn over its rows on all threads (prange), and the same loop on one. Both are cached on
    disk; numba names a cache entry by the function's qualified name, not by `parallel`, so the
    serial one is a copy of fn under another name."""
    name = fn.__name__ + "_serial"
    serial = types.FunctionType(fn.__code__.replace(co_name=name, co_qualname=name),
                                fn.__globals__, name)
    return (njit(parallel=True, fastmath=_FAST, cache=True)(fn),
            njit(fastmath=_FAST, cache=True)(serial))


def _pick(kernels, t: torch.Tensor):
    return kernels[0] if t.numel() >= PARALLEL_MIN else kernels[1]


def usable(*tensors) -> bool:
    """Whether the fused kernels take these tensors (float32, on the CPU)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _np_param(w: torch.Tensor) -> np.ndarray:
    """A copy of a (small) weight: a numpy view would make its storage non-resizable for good,
    and FSDP frees an unsharded parameter by resizing its storage to 0."""
    return w.detach().clone().numpy()


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# -- RMSNorm ----------------------------------------------------------------------------------

def _rms_norm_fwd(x, w, eps, y, rstd):
    n, h = x.shape
    for i in prange(n):
        s = np.float32(0.0)
        for j in range(h):
            s += x[i, j] * x[i, j]
        r = _ONE / np.sqrt(s / np.float32(h) + eps)
        rstd[i] = r
        for j in range(h):
            y[i, j] = w[j] * (x[i, j] * r)


def _rms_norm_bwd(g, x, w, rstd, gx, gw_parts):
    # y = w * x * r, r = (mean(x^2) + eps)^-1/2:
    # dx = r * (g * w - x * r^2 * mean(g * w * x)), dw = sum over rows of g * x * r
    n, h = x.shape
    parts = gw_parts.shape[0]
    per = (n + parts - 1) // parts
    for c in prange(parts):  # each part sums its rows' dw on its own: no shared writes
        acc = gw_parts[c]
        for i in range(c * per, min(n, (c + 1) * per)):
            r = rstd[i]
            s = np.float32(0.0)
            for j in range(h):
                s += g[i, j] * w[j] * x[i, j]
            s *= r * r / np.float32(h)
            for j in range(h):
                gx[i, j] = r * (g[i, j] * w[j] - x[i, j] * s)
                acc[j] += g[i, j] * x[i, j] * r


_RMS_FWD, _RMS_BWD = _compiled(_rms_norm_fwd), _compiled(_rms_norm_bwd)


def _rms_forward(x, weight, eps):
    """(y shaped as x, x as rows [N, H] contiguous, 1/rms per row)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty_like(x2)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32)
    _pick(_RMS_FWD, x2)(_np(x2), _np_param(weight), np.float32(eps), y.numpy(), rstd.numpy())
    return y.view(x.shape), x2, rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, x2, rstd = _rms_forward(x, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        x2, weight, rstd = ctx.saved_tensors
        gx = torch.empty_like(x2)
        threads = numba.get_num_threads() if x2.numel() >= PARALLEL_MIN else 1
        parts = torch.zeros(max(1, min(threads, len(x2))), x2.shape[1])  # dw per thread
        _pick(_RMS_BWD, x2)(_np(g.reshape(x2.shape).contiguous()), _np(x2), _np_param(weight),
                            rstd.numpy(), gx.numpy(), parts.numpy())
        return gx.view(g.shape), parts.sum(0), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2, -1) + eps), x [..., H] and weight [H] float32 on the CPU."""
    if _needs_grad(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    return _rms_forward(x, weight, eps)[0]


# -- rotary embedding -------------------------------------------------------------------------

def _rotary_kernel(x, cos, sin, out, inverse):
    # the rotate-half convention: out = x * cos + cat(-x2, x1) * sin; its inverse (the
    # backward's transpose) is the rotation by -angle with the same tables
    n, heads, d = x.shape
    half = d // 2
    for i in prange(n):
        for h in range(heads):
            for j in range(half):
                a, b = x[i, h, j], x[i, h, j + half]
                if inverse:
                    out[i, h, j] = a * cos[i, j] + b * sin[i, j + half]
                    out[i, h, j + half] = b * cos[i, j + half] - a * sin[i, j]
                else:
                    out[i, h, j] = a * cos[i, j] - b * sin[i, j]
                    out[i, h, j + half] = b * cos[i, j + half] + a * sin[i, j + half]


_ROTARY = _compiled(_rotary_kernel)


def _rotate(x, cos, sin, inverse: bool):
    out = torch.empty_like(x)
    _pick(_ROTARY, x)(_np(x), _np(cos), _np(sin), out.numpy(), inverse)
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, False)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _rotate(g.contiguous(), cos, sin, True), None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of x [T, heads, D] at the angles of cos / sin [T, D] (the
    rotate-half convention of the HF checkpoints; D even), float32 on the CPU."""
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    if _needs_grad(x):
        return _Rotary.apply(x, cos, sin)
    return _rotate(x, cos, sin, False)


# -- the model's modules ----------------------------------------------------------------------

def _norm_forward(module, x):
    if usable(x, module.weight):
        return rms_norm(x, module.weight, module.variance_epsilon)
    return type(module).forward(module, x)


def _rotary_for(original):
    """The modeling module's apply_rotary_pos_emb(q, k, cos, sin) with the fused kernel."""
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        # q / k [B, heads, T, D] (views of [B, T, heads, D]), cos / sin [B or 1, T, D]
        if args or kwargs or q.ndim != 4 or cos.ndim != 3 or not usable(q, k, cos, sin):
            return original(q, k, cos, sin, *args, **kwargs)
        b, _, t, d = q.shape
        c, s = cos.expand(b, t, d).reshape(b * t, d), sin.expand(b, t, d).reshape(b * t, d)

        def one(x):
            flat = x.transpose(1, 2).reshape(b * t, x.shape[1], d)
            return rotary(flat, c, s).view(b, t, x.shape[1], d).transpose(1, 2)
        return one(q), one(k)
    apply_rotary_pos_emb.gream_fused = True
    return apply_rotary_pos_emb


@contextlib.contextmanager
def fused_ops(model):
    """Inside: the model's RMSNorm modules and its attention's rotary embedding run the fused
    kernels on float32 CPU tensors (other tensors: the model's own code). Qwen3 / Qwen2 / Llama
    only (model types whose norms and rotate-half rotary embedding these are); other models
    run unchanged. Nests; restores the model on exit."""
    if getattr(model.config, "model_type", None) not in ("qwen3", "qwen2", "llama"):
        yield model
        return
    patched = []
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon"):
            patched.append((m, m.__dict__.get("forward")))
            m.forward = _norm_forward.__get__(m)
    # the attention calls its modeling module's apply_rotary_pos_emb by name (the module
    # named after the model type: a wrapper such as FSDP's may subclass the model elsewhere)
    kind = model.config.model_type
    modeling = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    rope = getattr(modeling, "apply_rotary_pos_emb", None)
    if rope is not None and not getattr(rope, "gream_fused", False):
        modeling.apply_rotary_pos_emb = _rotary_for(rope)
    else:
        rope = None  # absent, or an outer fused_ops already replaced it
    try:
        yield model
    finally:
        if rope is not None:
            modeling.apply_rotary_pos_emb = rope
        for m, before in reversed(patched):
            if before is None:
                del m.forward
            else:
                m.forward = before
