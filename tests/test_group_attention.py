"""Group (shared-prefix) attention for training: the Triton kernels (through the interpreter) and
the chunked CPU path against the torch reference and a naive dense-mask oracle (SDPA with the
[N, N] mask built from the definition, not from the layout), on fresh random inputs: several
groups, ragged prompts and responses, n = 1, responses longer than their prompt, 1-token prompts
and responses, groups smaller than a block, GQA and MHA, fp32 / bf16 / fp16; values, lse and
the gradients of q, k, v (through o and lse). Also: the layout against the definition, the block
tables, determinism, what each path saves for backward (linear in the tokens), bad inputs."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gream_fast.errors import InvalidInputError
from gream_fast.kernels.group_attention import (GroupLayout, group_attention,
                                                group_attention_reference, group_layout)

# the module itself (gream_fast.kernels.group_attention, the attribute, is the function)
ga = importlib.import_module("gream_fast.kernels.group_attention")


# ---------------------------------------------------------------------------------------------
# Oracles and inputs
# ---------------------------------------------------------------------------------------------
def dense_mask(prompts, responses):
    """[N, N] bool from the definition: same group, causal, and the key is a prompt token or in
    the query's own segment."""
    group, seg, is_prompt = [], [], []
    s = 0
    for g, (p, rs) in enumerate(zip(prompts, responses)):
        for n, prompt in [(p, True)] + [(r, False) for r in rs]:
            group += [g] * n
            seg += [s] * n
            is_prompt += [prompt] * n
            s += 1
    group, seg, is_prompt = map(torch.tensor, (group, seg, is_prompt))
    i = torch.arange(len(group))
    return ((group[:, None] == group[None, :]) & (i[None, :] <= i[:, None])
            & (is_prompt[None, :] | (seg[:, None] == seg[None, :])))


def oracle(q, k, v, mask, scale=None):
    """(o, lse) in float64 over the dense mask: SDPA for o, logsumexp of the masked scores."""
    G = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh = q.double().transpose(0, 1)
    kh = k.double().repeat_interleave(G, 1).transpose(0, 1)
    vh = v.double().repeat_interleave(G, 1).transpose(0, 1)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale).transpose(0, 1)
    s = (qh @ kh.transpose(1, 2) * scale).masked_fill(~mask, float("-inf"))
    return o, torch.logsumexp(s, -1).T


def make(n, hq, hkv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv)]


def outputs_and_grads(fn, q, k, v, seed=1, **kw):
    """o, lse and the gradients of q, k, v of sum(o * go) + sum(lse * gl) for random go, gl."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, lse = fn(q, k, v, return_lse=True, **kw)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(o.shape, generator=g).to(o)
    gl = torch.randn(lse.shape, generator=g).to(lse)
    dq, dk, dv = torch.autograd.grad((o * go).sum() + (lse * gl).sum(), (q, k, v))
    return o, lse, dq, dk, dv


def cpu_path(q, k, v, layout, scale=None, return_lse=False, chunk_elems=None):
    """The chunked CPU path (what group_attention runs on CPU without TRITON_INTERPRET)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, lse = ga._ChunkedGroupAttention.apply(q, k, v, layout, scale,
                                             chunk_elems or ga._CHUNK_ELEMS)
    return (o, lse) if return_lse else o


# Several groups; ragged prompts and responses; n = 1 (groups 1 and 2); responses longer than
# their prompt (30 > 20, 40 > 17); a 1-token prompt (group 1) and 1-token responses; 141 tokens:
# 16-token blocks under the interpreter straddle prompt/response and response/response bounds.
PROMPTS = [5, 1, 20, 17]
RESPONSES = [[7, 1, 12], [3], [30], [2, 2, 40, 1]]


def close(dtype, grad=False):
    if dtype == torch.float32:
        return dict(atol=1e-4 if grad else 2e-5, rtol=1e-4 if grad else 2e-5)
    return dict(atol=4e-2 if grad else 2e-2, rtol=2e-2)


def check_all(got, want, dtype):
    """got: (o, lse, dq, dk, dv) of a path; want: the same from an oracle (any dtype)."""
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        tol = close(dtype, grad=name.startswith("d"))
        torch.testing.assert_close(a.double(), b.double().to(a.dtype).double(), **tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# The layout
# ---------------------------------------------------------------------------------------------
def test_layout_of_the_docstring_example():
    lay = group_layout([3], [[2, 3]])
    assert (lay.N, lay.G) == (8, 1)
    assert lay.a_lo.tolist() == [0] * 8
    assert lay.a_hi.tolist() == [1, 2, 3, 3, 3, 3, 3, 3]
    assert lay.b_lo.tolist() == [1, 2, 3, 3, 3, 5, 5, 5]
    assert lay.q_hi.tolist() == [8, 8, 8, 5, 5, 8, 8, 8]
    assert lay.seg_cu.tolist() == [0, 3, 5, 8] and lay.group_seg.tolist() == [0, 3]
    assert lay.group_cu.tolist() == [0, 8]
    assert all(getattr(lay, f).dtype == torch.int32 for f in ga._LAYOUT_TENSORS)


def test_layout_ranges_are_the_definition():
    lay = group_layout(PROMPTS, RESPONSES)
    mask = dense_mask(PROMPTS, RESPONSES)
    N = mask.shape[0]
    assert lay.N == N and lay.G == 4
    j = torch.arange(N)
    a = (j[None] >= lay.a_lo[:, None]) & (j[None] < lay.a_hi[:, None])
    b = (j[None] >= lay.b_lo[:, None]) & (j[None] <= j[:, None])
    assert not (a & b).any()  # A and B are disjoint
    assert torch.equal(a | b, mask)  # query side: the keys of each token
    queries = (j[:, None] >= j[None]) & (j[:, None] < lay.q_hi[None])  # [query, key]
    assert torch.equal(queries, mask)  # key side: the queries of each key are [j, q_hi)
    assert lay.group_cu.tolist() == [0, 25, 29, 79, 141]


def test_group_layout_rejects_bad_lengths():
    with pytest.raises(InvalidInputError, match=r"prompt_lens\[1\]: expected an int >= 1, got 0"):
        group_layout([3, 0], [[1], [1]])
    with pytest.raises(InvalidInputError, match=r"response_lens\[0\]\[1\]: expected an int >= 1"):
        group_layout([3], [[1, 0]])
    with pytest.raises(InvalidInputError, match=r"response_lens\[0\]\[0\]: expected an int >= 1"):
        group_layout([3], [[1.5]])
    with pytest.raises(InvalidInputError, match=r"response_lens: expected one list per group"):
        group_layout([3, 4], [[1]])
    with pytest.raises(InvalidInputError, match=r"response_lens\[0\]: expected a list of ints"):
        group_layout([3], [4])
    # a group without responses is its prompt alone: plain causal attention
    assert group_layout([4], [[]]).q_hi.tolist() == [4, 4, 4, 4]
    # numpy integers are lengths too
    assert group_layout(np.array([3]), [np.array([2, 1])]).seg_cu.tolist() == [0, 3, 5, 6]


@pytest.mark.parametrize("block, keys", [(16, False), (16, True), (64, False), (5, True)])
def test_block_tables_tile_each_group(block, keys):
    lay = group_layout(PROMPTS, RESPONSES)
    blocks = ga._blocks(lay, block, keys)
    assert blocks.shape == (-(-lay.N // block) + lay.G, 2) and blocks.dtype == torch.int32
    used = blocks[blocks[:, 1] > blocks[:, 0]].tolist()
    covered = sorted(t for s, e in used for t in range(s, e))
    assert covered == list(range(lay.N))  # every token exactly once
    gcu = lay.group_cu.tolist()
    for s, e in used:  # within one group, at most `block` tokens, starting on the group's grid
        g = max(i for i in range(lay.G) if gcu[i] <= s)
        assert e <= gcu[g + 1] and e - s <= block and (s - gcu[g]) % block == 0
    assert ga._blocks(lay, block, keys) is blocks  # cached on the layout


# ---------------------------------------------------------------------------------------------
# Values and gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hq, hkv", [(4, 2), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference_and_oracle(hq, hkv, dtype, poisoned_empty):
    lay = group_layout(PROMPTS, RESPONSES)
    q, k, v = make(lay.N, hq, hkv, 32, dtype, seed=hq + hkv)
    got = outputs_and_grads(group_attention, q, k, v, layout=lay)  # the interpreter
    assert got[0].dtype == dtype and got[0].shape == q.shape and got[1].dtype == torch.float32
    assert [t.dtype for t in got[2:]] == [dtype] * 3
    ref = outputs_and_grads(group_attention_reference, q, k, v, layout=lay)
    dense = outputs_and_grads(lambda q, k, v, return_lse: oracle(q, k, v, dense_mask(
        PROMPTS, RESPONSES)), q.double(), k.double(), v.double())
    check_all(got, ref, dtype)
    check_all(got, dense, dtype)
    # the reference itself, in fp32 on the same values, against the dense oracle
    up = outputs_and_grads(group_attention_reference, q.float(), k.float(), v.float(), layout=lay)
    check_all(up, dense, torch.float32)


@pytest.mark.parametrize("dtype, hq, hkv, chunk_elems", [
    (torch.float32, 4, 2, 1 << 22), (torch.float32, 2, 2, 1200), (torch.bfloat16, 4, 2, 1200),
    (torch.bfloat16, 2, 2, 1 << 22)])
def test_cpu_path_matches_reference_and_oracle(dtype, hq, hkv, chunk_elems, poisoned_empty,
                                               monkeypatch):
    # group_attention's own dispatch as on a CPU without the interpreter; chunk_elems = 1200:
    # chunks of 2..16 rows (several per segment, and rows of two responses in one chunk)
    monkeypatch.setattr(ga, "use_triton", lambda *tensors: False)
    monkeypatch.setattr(ga, "_CHUNK_ELEMS", chunk_elems)
    lay = group_layout(PROMPTS, RESPONSES)
    q, k, v = make(lay.N, hq, hkv, 16, dtype, seed=hq * hkv)
    got = outputs_and_grads(group_attention, q, k, v, layout=lay)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    ref = outputs_and_grads(group_attention_reference, q, k, v, layout=lay)
    dense = outputs_and_grads(lambda q, k, v, return_lse: oracle(q, k, v, dense_mask(
        PROMPTS, RESPONSES)), q.double(), k.double(), v.double())
    check_all(got, ref, dtype)
    check_all(got, dense, dtype)


@pytest.mark.parametrize("dtype, hq, hkv", [(torch.float32, 4, 2), (torch.float32, 2, 2),
                                             (torch.bfloat16, 4, 1)])
def test_sdpa_cpu_path_matches_the_oracle(dtype, hq, hkv, monkeypatch):
    """group_attention on CPU without the interpreter and without lse: torch's fused attention
    per group over [prompt, response i] sequences; o and the gradients of q, k, v."""
    monkeypatch.setattr(ga, "use_triton", lambda *tensors: False)
    lay = group_layout(PROMPTS, RESPONSES)
    q, k, v = (t.requires_grad_() for t in make(lay.N, hq, hkv, 16, dtype, seed=hq + hkv))
    go = torch.randn(lay.N, hq, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    o = group_attention(q, k, v, lay)
    got = (o, *torch.autograd.grad((o * go).sum(), (q, k, v)))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    od, _ = oracle(qd, kd, vd, dense_mask(PROMPTS, RESPONSES))
    want = (od, *torch.autograd.grad((od * go.double()).sum(), (qd, kd, vd)))
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b, **close(dtype, grad=name != "o"), msg=name)
    assert o.dtype == dtype


def test_cpu_path_chunks_cover_and_bound_the_scores():
    lay = group_layout(PROMPTS, RESPONSES)
    for elems in (1 << 22, 3000, 300, 1):
        chunks = ga._chunks(lay, 4, elems)
        assert sorted(t for c0, c1, *_ in chunks for t in range(c0, c1)) == list(range(lay.N))
        for c0, c1, a0, a1, b0 in chunks:
            keys = (a1 - a0) + max(c1 - b0, 0)
            assert a1 <= b0 and (c1 - c0 == 1 or (c1 - c0) * keys * 4 <= elems)


def test_cpu_path_gradcheck_float64(monkeypatch):
    """The hand-written backward (through o and lse) against finite differences, in float64
    (the CPU path computes in float64 for float64 inputs), with chunks of a few rows."""
    monkeypatch.setattr(ga, "use_triton", lambda *tensors: False)
    monkeypatch.setattr(ga, "_CHUNK_ELEMS", 40)
    lay = group_layout([3, 1], [[2, 4], [2]])
    q, k, v = (t.double().requires_grad_() for t in make(lay.N, 2, 1, 4, seed=3))
    assert torch.autograd.gradcheck(
        lambda q, k, v: group_attention(q, k, v, lay, return_lse=True), (q, k, v))


@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_odd_shapes(path, poisoned_empty):
    # G = 3 (Hq = 6, Hkv = 2), D = 24 (padded to 32 in the kernel), fp16, an explicit scale;
    # 1-token groups, a group with one 1-token response, groups shorter than a 16-token block
    prompts, responses = [1, 1, 2, 40], [[1], [], [1, 1, 1], [3]]
    lay = group_layout(prompts, responses)
    q, k, v = make(lay.N, 6, 2, 24, torch.float16, seed=5)
    fn = group_attention if path == "triton" else cpu_path
    got = outputs_and_grads(fn, q, k, v, layout=lay, scale=0.3)
    dense = outputs_and_grads(lambda q, k, v, return_lse: oracle(q, k, v, dense_mask(
        prompts, responses), scale=0.3), q.double(), k.double(), v.double())
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, dense):
        torch.testing.assert_close(a.double(), b, atol=3e-3, rtol=3e-3, msg=name)


@pytest.mark.parametrize("path", ["triton", "cpu"])
def test_strided_inputs_and_an_expanded_gradient(path, poisoned_empty):
    """q, k, v as views of one fused qkv projection (row stride (Hq + 2 Hkv) D), and the
    stride-0 gradient that o.sum().backward() sends."""
    lay = group_layout([7, 2], [[9, 1], [20]])
    qkv = torch.randn(lay.N, 4 + 2 + 2, 16, generator=torch.Generator().manual_seed(9))
    qkv.requires_grad_()
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    fn = group_attention if path == "triton" else cpu_path
    fn(q, k, v, lay).sum().backward()
    ref = qkv.detach().clone().requires_grad_()
    group_attention_reference(ref[:, :4], ref[:, 4:6], ref[:, 6:], lay).sum().backward()
    torch.testing.assert_close(qkv.grad, ref.grad, atol=1e-5, rtol=1e-5)


def test_triton_calls_are_deterministic():
    """No atomics: every output element has one writer, so a call gives the same bits twice."""
    lay = group_layout([9, 4], [[20, 3], [17]])
    q, k, v = make(lay.N, 4, 2, 16, seed=6)
    first = outputs_and_grads(group_attention, q, k, v, layout=lay)
    again = outputs_and_grads(group_attention, q, k, v, layout=lay)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_check_false_and_without_lse(poisoned_empty):
    lay = group_layout([6], [[5, 9]])
    q, k, v = make(lay.N, 2, 1, 16, seed=7)
    o = group_attention(q, k, v, lay, check=False)
    torch.testing.assert_close(o, group_attention_reference(q, k, v, lay), atol=1e-5, rtol=1e-5)
    q.requires_grad_()
    group_attention(q, k, v, lay).sum().backward()  # o only: lse's gradient is None
    assert q.grad.shape == q.shape and torch.isfinite(q.grad).all()


def test_empty_stream():
    lay = group_layout([], [])
    q, k, v = (t.requires_grad_() for t in make(0, 2, 1, 8))
    o, lse = group_attention(q, k, v, lay, return_lse=True)
    assert o.shape == (0, 2, 8) and lse.shape == (0, 2)
    o.sum().backward()
    assert q.grad.shape == q.shape


# ---------------------------------------------------------------------------------------------
# Memory: what each path keeps for backward
# ---------------------------------------------------------------------------------------------
def saved_elements(fn):
    """Elements of every tensor autograd saves while fn() runs (each saved tensor counted each
    time it is saved; views counted at their own size)."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes), max(sizes, default=0)


@pytest.mark.parametrize("path", ["triton", "chunked", "sdpa"])
def test_saved_tensors_are_linear_in_tokens(path, monkeypatch):
    """The Triton and chunked paths save q, k, v, o and lse: at most 4 N Hq D + N Hq elements,
    whatever the lengths; the SDPA path the gathered sequences [prompt, response i] (the
    prompt once per response) and their output: at most 4 (N + (n - 1) P) Hq D + ... Hq.
    The plain-autograd reference keeps every probability: per head and response R x (P + R),
    so its saved elements per token grow with the response length. (This checks what is kept
    for backward; the chunked path's working memory in between is bounded by _CHUNK_ELEMS per
    buffer by construction, not measured here.)"""
    if path != "triton":
        monkeypatch.setattr(ga, "use_triton", lambda *tensors: False)
    fn = cpu_path if path == "chunked" else group_attention
    hq, d = 2, 16
    per_token = {}
    for r in (16, 64):
        lay = group_layout([8], [[r, r]])
        q, k, v = (t.requires_grad_() for t in make(lay.N, hq, 1, d, seed=r))
        total, largest = saved_elements(lambda: fn(q, k, v, lay))
        n_tok = lay.N + (8 if path == "sdpa" else 0)  # (the prompt again for the second response)
        assert total <= 4 * n_tok * hq * d + n_tok * hq and largest <= n_tok * hq * d
        ref_total, _ = saved_elements(lambda: group_attention_reference(q, k, v, lay))
        per_token[r] = (total / n_tok, ref_total / lay.N)
    (small, ref_small), (big, ref_big) = per_token.values()
    assert big == pytest.approx(small, rel=0.02)  # constant per (gathered) token
    assert ref_big > 2 * ref_small  # the reference's grows with R (~ P + R per token)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    lay = group_layout([5, 3], [[2], [1, 1]])
    q, k, v = make(lay.N, 4, 2, 8, seed=8)

    def bad(match, *, layout=lay, check=True, **changes):
        args = {"q": q, "k": k, "v": v, **changes}
        with pytest.raises(InvalidInputError, match=match):
            group_attention(args["q"], args["k"], args["v"], layout, check=check)

    bad(r"q: expected a float32/bfloat16/float16/float64 \[N, heads, D\] tensor, got "
        r"torch.float32 \[12, 4\]", q=q[..., 0])
    bad(r"q: expected a float32", q=q.long())
    bad(r"k: expected \[N=12, Hkv, D=8\], got \[12, 2, 4\]", k=k[..., :4])
    bad(r"k: expected \[N=12", k=k[1:])
    bad(r"v: expected the shape of k \[12, 2, 8\], got \[12, 1, 8\]", v=v[:, :1])
    bad(r"q has Hq=3 heads: expected a multiple of the Hkv=2", q=q[:, :3])
    bad(r"k: expected the dtype of q \(torch.float32\), got torch.float16", k=k.half())
    bad(r"layout: built for N=11 tokens, but q, k, v have N=12",
        layout=group_layout([5, 3], [[2], [1]]))
    bad(r"layout: expected a GroupLayout \(from group_layout\), got dict", layout={})
    bad(r"layout.a_lo is on meta but q on cpu", layout=lay.to("meta"))
    bad(r"layout.a_hi: expected a contiguous int32 vector",
        layout=GroupLayout(lay.a_lo, lay.a_hi.long(), lay.b_lo, lay.q_hi, lay.group_cu,
                           lay.seg_cu, lay.group_seg, N=lay.N, G=lay.G))
    # values: a hand-edited layout is refused (check=True), named at the first bad token
    edited = group_layout([5, 3], [[2], [1, 1]])
    edited.a_hi[6] = 4
    bad(r"layout.a_hi\[6\] = 4, expected 5 from seg_cu and group_seg", layout=edited)
    broken = GroupLayout(lay.a_lo, lay.a_hi, lay.b_lo, lay.q_hi, lay.group_cu,
                         torch.tensor([0, 5, 7, 7, 11, 12], dtype=torch.int32), lay.group_seg,
                         N=lay.N, G=lay.G)
    bad(r"layout.seg_cu / layout.group_seg: expected segment offsets from 0 to N=12",
        layout=broken)
    # check=False trusts the values (here: drops one prompt key of token 6)
    group_attention(q, k, v, edited, check=False)
    # a layout is checked once: a later in-place edit goes unseen (documented)
    fresh = group_layout([5, 3], [[2], [1, 1]])
    group_attention(q, k, v, fresh)
    fresh.a_hi[6] = 4
    group_attention(q, k, v, fresh)
    bad(r"head dim D=512, the Triton path takes D <= 256",
        q=torch.zeros(12, 4, 512), k=torch.zeros(12, 2, 512), v=torch.zeros(12, 2, 512))


# ---------------------------------------------------------------------------------------------
# sm_90 compilation (no GPU needed) and the GPU itself
# ---------------------------------------------------------------------------------------------
COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
ga = importlib.import_module("gream_fast.kernels.group_attention")
args = {
    "_fwd_kernel": "q k v o".split(),
    "_dq_kernel": "q k v do dq".split(),
    "_dkdv_kernel": "q k v do dk dv".split(),
}
for name, tensors in args.items():
    fn = getattr(ga, name)
    for ty, dtype, d, g in json.loads(sys.argv[1]):
        kind = name[1:-7]
        bm, bn, bd, warps, stages = ga._config(d, getattr(ga.torch, dtype), kind)
        consts = dict(G=g, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, UPCAST=False, PRECISION="ieee")
        sig = {}
        for a in fn.arg_names:
            if a in consts:
                sig[a] = "constexpr"
            elif a[:-4] in tensors:
                sig[a] = ty
            elif a in ("lse_ptr", "delta_ptr"):
                sig[a] = "*fp32"
            elif a.endswith("_ptr"):
                sig[a] = "*i32"
            else:
                sig[a] = "fp32" if "scale" in a else "i32"
        out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                             target=GPUTarget("cuda", 90, 32),
                             options=dict(num_warps=warps, num_stages=stages))
        assert out.asm.get("cubin"), (name, ty, d)
        print("OK", name, ty, d, g, out.metadata.shared)
consts = dict(BLOCK_R=64, BLOCK_D=128, HAS_DLSE=True)
sig = {"o_ptr": "*bf16", "do_ptr": "*bf16", "dlse_ptr": "*fp32", "delta_ptr": "*fp32",
       "R": "i32", "D": "i32", **{k: "constexpr" for k in consts}}
out = triton.compile(ASTSource(fn=ga._delta_kernel, signature=sig, constexprs=consts),
                     target=GPUTarget("cuda", 90, 32))
assert out.asm.get("cubin")
print("OK _delta_kernel")
"""


def test_kernels_compile_for_sm90():
    """The compiler accepts what the interpreter runs (it can reject code the interpreter
    takes): each attention kernel with the production tiles, bf16 at D = 128 (G = 2) and fp32
    at D = 64 (G = 1), and the delta kernel. ~10 s; a subprocess, as interpreter mode is fixed
    at import."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    variants = [["*bf16", "bfloat16", 128, 2], ["*fp32", "float32", 64, 1]]
    out = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(variants)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("OK") == 7, out.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, d, rel", [(torch.bfloat16, 128, 1e-2), (torch.float16, 64, 3e-3),
                                           (torch.float32, 64, 1e-5), (torch.bfloat16, 256, 1e-2)])
def test_cuda_kernels_match_reference(dtype, d, rel):
    """Qwen3-0.6B heads (16 / 8), ragged groups (prompts of 300 and 77 tokens, responses of 1 to
    400): o, lse, dq, dk, dv against the fp32 reference, by relative error norm; a second call
    gives the same bits."""
    prompts, responses = [300, 77], [[400, 5, 1, 129], [64, 200]]
    lay = group_layout(prompts, responses, device="cuda")
    q, k, v = (t.cuda() for t in make(lay.N, 16, 8, d, dtype, seed=d))
    want = outputs_and_grads(group_attention_reference, q.float(), k.float(), v.float(),
                             layout=lay)
    got = outputs_and_grads(group_attention, q, k, v, layout=lay)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < rel, f"{name}: relative error {err:.3g}"
    again = outputs_and_grads(group_attention, q, k, v, layout=lay)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


def test_benchmark_runs_on_cpu(tmp_path, monkeypatch, capsys):
    """bench_group_attention --quick on CPU (the chunked path, as on a CPU without the
    interpreter): it checks its answers against the dense-mask SDPA baseline and records a row
    per (case, implementation, mode)."""
    monkeypatch.setattr(ga, "use_triton", lambda *tensors: False)
    monkeypatch.delenv("OUT", raising=False)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import bench_group_attention

    bench_group_attention.main(["--quick", "--repeat", "1", "--out", str(tmp_path), "--device",
                                "cpu"])
    (record,) = tmp_path.glob("*.json")
    rows = json.loads(record.read_text())["rows"]
    assert len(rows) == 8 and all(r["time_ms"] > 0 and r["ratio"] > 0 for r in rows)
    assert "ratio" in capsys.readouterr().out
