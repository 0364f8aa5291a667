"""Shared-prefix packing: log-probs and gradients equal the n-copies computation."""
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from gream_fast import GreamError
from gream_fast.train.group_pack import pack_groups, response_hidden


def tiny(seed=0):
    cfg = Qwen3Config(vocab_size=90, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                      tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


def data(seed):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 90, (int(n),), generator=g).tolist() for n in (7, 12, 4)]
    responses = [[torch.randint(1, 90, (int(torch.randint(1, 6, (1,), generator=g)),),
                                generator=g).tolist() for _ in range(n)] for n in (4, 3, 5)]
    return prompts, responses


def packed_logp(model, prompts, responses):
    batch = pack_groups(prompts, responses)
    h = response_hidden(model, batch)
    logp = torch.log_softmax(model.lm_head(h).float(), -1)
    return logp.gather(1, batch.target[:, None]).squeeze(1), batch


def copies_logp(model, prompts, responses):
    out = []
    for p, rs in zip(prompts, responses):
        for r in rs:
            logits = model(torch.tensor([p + r])).logits[0].float()
            lp = torch.log_softmax(logits[len(p) - 1:-1], -1)
            out.append(lp[torch.arange(len(r)), torch.tensor(r)])
    return torch.cat(out)


def test_logprobs_and_gradients_equal_n_copies():
    prompts, responses = data(0)
    model = tiny()
    a, batch = packed_logp(model, prompts, responses)
    weights = torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    (a * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    b = copies_logp(model, prompts, responses)
    (b * weights).sum().backward()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    n_copies = sum(len(p) + len(r) for p, rs in zip(prompts, responses) for r in rs)
    assert batch.num_tokens == sum(len(p) + sum(map(len, rs)) for p, rs in zip(prompts, responses))
    assert batch.num_tokens < n_copies
    assert batch.response.tolist() == [i for i, r in enumerate(sum(responses, [])) for _ in r]


def test_bad_groups():
    with pytest.raises(GreamError, match="group 1"):
        pack_groups([[1, 2], [3]], [[[4]], [[]]])
    with pytest.raises(GreamError, match="2 prompts but 1"):
        pack_groups([[1, 2], [3]], [[[4]]])
