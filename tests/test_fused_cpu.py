"""model.fused_cpu: the fused RMSNorm and rotary kernels against transformers' own modules
(values and gradients, fresh random inputs, the serial and the parallel kernel), and
fused_ops() on whole models: the same logits and gradients, the model restored after."""
import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config
from transformers.models.qwen3 import modeling_qwen3
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from gream_fast.model import fused_cpu
from gream_fast.model.fused_cpu import fused_ops

# rows x width on each side of the parallel kernel's threshold
SHAPES = [(1, 8), (37, 48), (fused_cpu.PARALLEL_MIN // 64 + 3, 64)]


def _grads(out, inputs, seed):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("rows,width", SHAPES)
def test_rms_norm_matches_transformers(rows, width):
    torch.manual_seed(rows + width)
    norm = Qwen3RMSNorm(width, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(rows, width) * 3).requires_grad_()
    want = norm(x)
    got = fused_cpu.rms_norm(x, norm.weight, norm.variance_epsilon)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(_grads(got, (x, norm.weight), 1), _grads(want, (x, norm.weight), 1)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the inference path (no autograd node) gives the same values
        torch.testing.assert_close(fused_cpu.rms_norm(x, norm.weight, 1e-6), want.detach())


def test_rms_norm_keeps_leading_dims():
    x, w = torch.randn(2, 5, 3, 16), torch.randn(16)
    want = Qwen3RMSNorm(16)
    with torch.no_grad():
        want.weight.copy_(w)
        torch.testing.assert_close(fused_cpu.rms_norm(x, w, 1e-6), want(x), atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("tokens,heads,dim", [(1, 1, 2), (29, 3, 12), (2100, 4, 32)])
def test_rotary_matches_transformers(tokens, heads, dim):
    """Against apply_rotary_pos_emb on [1, heads, T, D] views of [1, T, heads, D] (how the
    attention calls it), at angles from the model's own rotary embedding."""
    torch.manual_seed(tokens)
    rope = modeling_qwen3.Qwen3RotaryEmbedding(Qwen3Config(head_dim=dim, hidden_size=dim * heads,
                                                           num_attention_heads=heads))
    q = torch.randn(1, tokens, heads, dim).transpose(1, 2).requires_grad_()
    k = torch.randn(1, tokens, 1, dim).transpose(1, 2).requires_grad_()
    pos = torch.randperm(4 * tokens)[:tokens][None]  # any positions (packs restart them)
    cos, sin = rope(q, pos)
    want = modeling_qwen3.apply_rotary_pos_emb(q, k, cos, sin)
    flat = q.transpose(1, 2)[0]
    got = fused_cpu.rotary(flat, cos[0], sin[0])
    torch.testing.assert_close(got, want[0].transpose(1, 2)[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_grads(got, (q,), 2)[0],
                               _grads(want[0].transpose(1, 2)[0], (q,), 2)[0], atol=1e-6,
                               rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fused_cpu.rotary(flat, cos[0], sin[0]), got.detach())


def _model(kind, seed=0):
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  tie_word_embeddings=False)
    cfg = Qwen3Config(**common) if kind == "qwen3" else LlamaConfig(**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


def _pass(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.log_softmax(-1)[..., 0].sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_fused_ops_same_logits_and_gradients(kind):
    model = _model(kind)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    want_logits, want_grads = _pass(model, ids)
    modeling = importlib.import_module(type(model).__module__)
    rope = modeling.apply_rotary_pos_emb
    with fused_ops(model):
        assert modeling.apply_rotary_pos_emb is not rope
        with fused_ops(model):  # nested: still fused, then the outer setting back
            pass
        assert getattr(modeling.apply_rotary_pos_emb, "gream_fused", False)
        got_logits, got_grads = _pass(model, ids)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    # restored: the modules' own forward again, the modeling module's function again
    assert modeling.apply_rotary_pos_emb is rope
    assert not any("forward" in vars(m) for m in model.modules())
    torch.testing.assert_close(_pass(model, ids)[0], want_logits, atol=0, rtol=0)


def test_fused_ops_leaves_other_dtypes_to_the_model():
    """bfloat16 tensors run the model's own code inside the block: the same bits."""
    model = _model("qwen3").to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with fused_ops(model):
            got = model(input_ids=ids).logits
    assert torch.equal(got, want)
