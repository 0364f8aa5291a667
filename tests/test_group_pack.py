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


def test_packed_pass_equals_sdpa_with_the_dense_mask():
    """The group attention inside the model gives the hidden states of SDPA with the layout's
    [N, N] mask (what the pass used before it had no mask)."""
    prompts, responses = data(2)
    model = tiny(3)
    batch = pack_groups(prompts, responses)
    got = response_hidden(model, batch)
    with torch.no_grad():
        out = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                          attention_mask=batch.dense_mask(), use_cache=False)
    torch.testing.assert_close(got.detach(), out.last_hidden_state[0, batch.source],
                               atol=1e-5, rtol=1e-5)


def test_split_groups_keeps_every_response_in_order():
    from gream_fast.train.group_pack import split_groups

    prompts, responses = data(4)
    flat = [r for rs in responses for r in rs]
    for budget in (0, 1, 9, 20, 40, 10_000):
        packs = split_groups(prompts, responses, budget)
        seen = [i for _, _, idx in packs for i in idx]
        assert seen == list(range(len(flat)))  # every response once, in order
        for groups, rs, idx in packs:
            assert [r for part in rs for r in part] == [flat[i] for i in idx]
            size = sum(len(prompts[g]) + sum(map(len, part)) for g, part in zip(groups, rs))
            alone = len(groups) == 1 and len(rs[0]) == 1  # a prompt + response over budget
            assert not budget or size <= budget or alone
    assert len(split_groups(prompts, responses, 0)) == 1


@pytest.mark.usefixtures("torch_kernels")
def test_reference_shape_pass_memory_is_linear_in_tokens():
    """One group at the paper's reasoning shape (prompt 768, 10 responses of 1,560 tokens:
    16,368 tokens) through the policy's log-prob pass, forward and backward, on a small model:
    the peak memory (RSS above the start) stays under 32 KiB per token (measured ~17 KiB). The
    dense path it replaces needed a [T, T] mask (T bytes per token, 16 KiB) plus, per layer,
    T x heads x 4 bytes of scores per token (128 KiB): GBs."""
    from pathlib import Path

    from gream_fast.train.srpo import response_logprobs

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    g = torch.Generator().manual_seed(0)
    P, n, R = 768, 10, 1560
    prompts = [torch.randint(1, 512, (P,), generator=g).tolist()]
    responses = [[torch.randint(1, 512, (R,), generator=g).tolist() for _ in range(n)]]
    batch = pack_groups(prompts, responses)
    T = batch.num_tokens
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the RSS now
    start = status("VmRSS")
    logp = response_logprobs(model, batch)
    logp.sum().backward()
    peak = status("VmHWM") - start
    assert T == P + n * R and torch.isfinite(logp).all() and len(logp) == n * R
    assert peak < T * 32 * 1024, f"{peak / T / 1024:.1f} KiB per token"
