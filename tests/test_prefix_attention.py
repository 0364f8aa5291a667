"""Shared-prefix decode attention (Triton through the interpreter) against its torch reference and
a naive per-row oracle, on fresh random inputs: ragged prompts, prompts with 0 and 1 rows,
empty suffixes, GQA and MHA, several row blocks per prompt, fp32 and bf16, and the prompt KV
split across programs (flash-decoding) into 2..8 chunks."""
import pytest
import torch

from gream_fast.errors import InvalidInputError
from gream_fast.kernels.prefix_attention import (choose_splits, shared_prefix_attention,
                                                 shared_prefix_attention_reference)


def naive(q, prefix_k, prefix_v, prefix_cu, row_cu, suffix_k, suffix_v, suffix_lens, scale=None):
    """Row by row: concatenate the prompt's KV and the row's suffix KV, repeat_kv, softmax."""
    R, Hq, D = q.shape
    G = Hq // prefix_k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(R, Hq, D)
    for b in range(len(prefix_cu) - 1):
        p0, p1 = prefix_cu[b].item(), prefix_cu[b + 1].item()
        for r in range(row_cu[b].item(), row_cu[b + 1].item()):
            n = suffix_lens[r].item()
            k = torch.cat([prefix_k[p0:p1], suffix_k[r, :n]]).float().repeat_interleave(G, dim=1)
            v = torch.cat([prefix_v[p0:p1], suffix_v[r, :n]]).float().repeat_interleave(G, dim=1)
            w = (torch.einsum("hd,nhd->hn", q[r].float(), k) * scale).softmax(-1)
            out[r] = torch.einsum("hn,nhd->hd", w, v)
    return out


def cu(lengths):
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)


def make(prompt_lens, rows, hq, hkv, d, s_cap, dtype=torch.float32, seed=0):
    """Random inputs; suffix entries past each row's length hold NaN keys and huge values, so a
    kernel that reads them fails."""
    g = torch.Generator().manual_seed(seed)
    T, R = sum(prompt_lens), sum(rows)
    suffix_lens = torch.randint(0, s_cap + 1, (R,), generator=g, dtype=torch.int32)
    suffix_lens[:2] = torch.tensor([0, s_cap])[:R]  # an empty and a full suffix
    sk = torch.randn(R, s_cap, hkv, d, generator=g)
    sv = torch.randn(R, s_cap, hkv, d, generator=g)
    past = torch.arange(s_cap)[None, :] >= suffix_lens[:, None]
    sk[past], sv[past] = float("nan"), 1e4
    return dict(q=torch.randn(R, hq, d, generator=g).to(dtype),
                prefix_k=torch.randn(T, hkv, d, generator=g).to(dtype),
                prefix_v=torch.randn(T, hkv, d, generator=g).to(dtype),
                prefix_cu=cu(prompt_lens), row_cu=cu(rows), suffix_k=sk.to(dtype),
                suffix_v=sv.to(dtype), suffix_lens=suffix_lens)


def clean(args):
    """The same inputs with the padding past the suffix lengths zeroed (for the reference, whose
    masked weights are 0 but 0 * NaN is not)."""
    args = dict(args)
    past = torch.arange(args["suffix_k"].shape[1])[None, :] >= args["suffix_lens"][:, None]
    for name in ("suffix_k", "suffix_v"):
        args[name] = args[name].clone()
        args[name][past] = 0
    return args


# Prompt lengths not multiples of the block (16 under the interpreter); rows per prompt: 0, 1, and
# 20 (two row blocks for MHA, three for GQA).
PROMPTS = [37, 5, 50, 1, 23]
ROWS = [3, 0, 1, 20, 6]


@pytest.mark.parametrize("hq, hkv", [(4, 2), (2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_and_oracle(hq, hkv, dtype, poisoned_empty):
    args = make(PROMPTS, ROWS, hq, hkv, 32, 7, dtype, seed=hq + hkv)
    o = shared_prefix_attention(**args)
    assert o.dtype == dtype and o.shape == args["q"].shape
    ref = shared_prefix_attention_reference(**clean(args))
    oracle = naive(**args)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(o, ref, **tol)
    torch.testing.assert_close(o.float(), oracle, **tol)
    # the reference itself, on the same values in fp32 (no final rounding), against the oracle
    up = {k: v.float() if v.is_floating_point() else v for k, v in clean(args).items()}
    torch.testing.assert_close(shared_prefix_attention_reference(**up), oracle, atol=1e-5,
                               rtol=1e-5)


def test_odd_group_odd_head_dim_several_programs_per_prompt(poisoned_empty):
    # G = 3 (padded to 4 lanes), D = 24 (padded to 32), fp16, an explicit scale; 2 prompts with
    # 20 and 13 rows: more than one program per (prompt, KV head).
    args = make([19, 40], [20, 13], 6, 2, 24, 5, torch.float16, seed=7)
    o = shared_prefix_attention(**args, scale=0.3)
    torch.testing.assert_close(o.float(), naive(**args, scale=0.3), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(o, shared_prefix_attention_reference(**clean(args), scale=0.3),
                               atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("num_splits", [2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_prompt_matches_reference_and_oracle(num_splits, dtype, poisoned_empty):
    # Ragged prompts of 1..70 tokens (16-token tiles: 1 to 5 tiles), so that with 8 splits most
    # chunks of the short prompts are empty and with 2 or 3 the long ones have several tiles per
    # chunk; 20 rows (several row blocks in each split program), prompts with 0 and 1 rows, an
    # empty and a full suffix (make). The partials come from the poisoned torch.empty: a chunk
    # that writes nothing fails.
    args = make([70, 5, 33, 1, 48], [3, 0, 20, 1, 6], 6, 2, 16, 5, dtype, seed=num_splits)
    o = shared_prefix_attention(**args, num_splits=num_splits)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(o.float(), naive(**args), **tol)
    torch.testing.assert_close(o, shared_prefix_attention_reference(**clean(args)), **tol)
    if dtype == torch.float32:  # the split changes the order of the sums only
        torch.testing.assert_close(o, shared_prefix_attention(**args, num_splits=1), atol=1e-6,
                                   rtol=1e-6)


def test_split_with_no_suffix_at_all(poisoned_empty):
    args = make([40, 9], [2, 3], 2, 1, 16, 3, seed=8)
    args["suffix_lens"].zero_()
    o = shared_prefix_attention(**args, num_splits=3)
    torch.testing.assert_close(o, naive(**args), atol=1e-5, rtol=1e-5)


def test_choose_splits_from_shapes():
    # enough (prompt, KV head, row block) programs already: no split
    assert choose_splits(64, 8, 64 * 4096, 1, sm_count=132) == 1
    # one long prompt and one KV head: as many splits as fill the SMs, capped at _MAX_SPLITS
    assert choose_splits(1, 1, 32768, 1, sm_count=132) == 16
    # few programs, but the prompts are short: chunks would be under 256 tokens
    assert choose_splits(2, 2, 2 * 300, 1, sm_count=132) == 1
    assert choose_splits(2, 2, 2 * 1024, 1, sm_count=132) == 4
    # 4 prompts x 2 KV heads x 1 row block, 2 x 8 SMs = 16 programs wanted: 2 splits
    assert choose_splits(4, 2, 4 * 4096, 1, sm_count=8) == 2


def test_identical_rows_agree_and_calls_are_deterministic():
    """Beam search at its first step: every row of a prompt has the same query and suffix.
    What we promise: a call is deterministic (the same inputs give the same bits, run to run),
    and identical rows agree to float32 rounding. Not bit-equality across rows: rows sit at
    different positions of the [rows, keys] tile products, and the matrix kernel under them
    (BLAS in Triton's interpreter, the CPU reference's einsum) may sum a row's products in an
    order that depends on its position and on the CPU's vector width (seen: up to 1.8e-7 apart
    on another 2-core x86 machine, and here with AVX2 kernels forced: OPENBLAS_CORETYPE=Haswell;
    equal with AVX-512)."""
    args = make([29, 11], [20, 3], 4, 2, 32, 4, seed=3)
    for name in ("q", "suffix_k", "suffix_v", "suffix_lens"):
        args[name][:20] = args[name][0]
    o = shared_prefix_attention(**args)
    assert torch.equal(o, shared_prefix_attention(**args))
    torch.testing.assert_close(o[:20], o[:1].expand(20, -1, -1), atol=1e-6, rtol=1e-6)


def test_check_false_and_no_suffix_at_all():
    args = make([9, 3], [2, 2], 2, 1, 16, 3, seed=4)
    args["suffix_lens"].zero_()
    o = shared_prefix_attention(**args, check=False)
    torch.testing.assert_close(o, naive(**args), atol=1e-5, rtol=1e-5)


def test_empty_prompt_in_reference_and_no_rows():
    args = clean(make([4, 6], [2, 1], 2, 2, 8, 2, seed=5))
    # prompt 0 emptied: its rows attend to their suffix only (0 when that is empty too)
    empty = dict(args, prefix_k=args["prefix_k"][4:], prefix_v=args["prefix_v"][4:],
                 prefix_cu=torch.tensor([0, 0, 6], dtype=torch.int32))
    o = shared_prefix_attention_reference(**empty)
    torch.testing.assert_close(o, naive(**empty).nan_to_num(0.0), atol=1e-5, rtol=1e-5)
    assert o[0].abs().sum() == 0  # row 0: no suffix either
    none = make([4], [0], 2, 2, 8, 2)
    assert shared_prefix_attention(**none).shape == (0, 2, 8)


def test_bad_inputs():
    args = make([5, 3], [2, 1], 4, 2, 8, 3, seed=6)

    def bad(match, **changes):
        with pytest.raises(InvalidInputError, match=match):
            shared_prefix_attention(**dict(args, **changes))

    bad(r"prefix_k: expected \[T, Hkv, D=8\]", prefix_k=args["prefix_k"][..., :4])
    bad("prefix_v: expected the shape", prefix_v=args["prefix_v"][1:])
    bad(r"suffix_k: expected \[R=3", suffix_k=args["suffix_k"][1:])
    bad("suffix_v: expected the shape", suffix_v=args["suffix_v"][:, 1:])
    bad("Hq=3 heads: expected a multiple of the Hkv=2", q=args["q"][:, :3])
    bad("row_cu: expected an integer tensor of the shape", row_cu=args["row_cu"][1:])
    bad("row_cu: expected nondecreasing offsets from 0 to R = 3",
        row_cu=torch.tensor([0, 2, 2], dtype=torch.int32))  # row 2 belongs to no prompt
    bad("row_cu: expected nondecreasing", row_cu=torch.tensor([0, 3, 2], dtype=torch.int32))
    bad("prefix_cu: expected prefix_cu", prefix_cu=torch.tensor([0, 5, 7], dtype=torch.int32))
    bad("prompt 1 has 0", prefix_cu=torch.tensor([0, 8, 8], dtype=torch.int32))
    bad(r"suffix_lens: expected values in 0..S = 3 \(the suffix capacity\), got 0..4",
        suffix_lens=torch.tensor([0, 4, 1], dtype=torch.int32))
    bad(r"suffix_lens: expected an integer \[R=3\]", suffix_lens=torch.zeros(3))
    bad("prefix_k: expected the dtype of q", prefix_k=args["prefix_k"].double())
    bad("q: expected a float", q=args["q"][0])
    bad("num_splits: expected >= 1, got 0", num_splits=0)


@pytest.mark.gpu
def test_cuda_kernel_matches_reference():
    # Realistic decode shapes: 8 prompts of 200..1500 tokens, 0..32 beams each, GQA 28/4 (G = 7),
    # D = 128, suffixes up to 48.
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(200, 1500, (8,), generator=g).tolist()
    rows = [16, 0, 1, 32, 5, 16, 16, 9]
    for dtype, d, tol in ((torch.bfloat16, 128, 2e-2), (torch.float32, 64, 1e-4)):
        args = clean(make(prompts, rows, 28, 4, d, 48, dtype, seed=d))
        ref = shared_prefix_attention_reference(**args)
        for num_splits in (None, 1, 5):
            o = shared_prefix_attention(**{k: v.cuda() for k, v in args.items()},
                                        num_splits=num_splits)
            torch.testing.assert_close(o.cpu(), ref, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_cuda_long_prompts_split_automatically():
    # 2 prompts of ~6k tokens, 4 rows each, 2 KV heads: 4 (prompt, KV head) pairs, far under
    # 2 programs per SM, so choose_splits splits them
    from gream_fast.kernels.prefix_attention import _sm_count
    args = clean(make([6000, 5100], [4, 4], 16, 2, 128, 9, torch.bfloat16, seed=11))
    assert choose_splits(2, 2, 11100, 1, _sm_count(torch.device("cuda"))) > 1
    o = shared_prefix_attention(**{k: v.cuda() for k, v in args.items()})
    torch.testing.assert_close(o.cpu(), shared_prefix_attention_reference(**args), atol=2e-2,
                               rtol=2e-2)


@pytest.mark.parametrize("prompts, rows, hq, hkv, d, s_cap, dtype", [
    ([29, 11, 1], [5, 0, 3], 4, 2, 32, 6, torch.float32),
    ([7, 40], [1, 9], 8, 8, 16, 3, torch.float32),
    ([16, 5], [4, 4], 4, 1, 64, 5, torch.bfloat16),
    ([12, 12], [4, 4], 4, 2, 32, 4, torch.float32),  # equal prompts and rows: the views path
])
def test_cpu_path_matches_the_reference(prompts, rows, hq, hkv, d, s_cap, dtype):
    """The CPU path (torch's fused CPU attention + LSE merge), which the runner uses on CPU
    tensors outside the interpreter, against the reference: ragged prompts, a prompt with no
    rows, empty and full suffixes (poisoned past their lengths), GQA and MHA, bf16."""
    from gream_fast.kernels.prefix_attention import _CPU_ATTENTION, _shared_prefix_attention_cpu

    if _CPU_ATTENTION is None:
        pytest.skip("this torch has no fused CPU attention op")
    args = make(prompts, rows, hq, hkv, d, s_cap, dtype, seed=sum(prompts))
    got = _shared_prefix_attention_cpu(*args.values(), d ** -0.5)
    want = shared_prefix_attention_reference(**clean(args))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    assert got.dtype == dtype and torch.isfinite(got).all()
