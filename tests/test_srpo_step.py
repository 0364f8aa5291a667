"""One SRPO step end to end on a tiny model: rollouts, rewards, dynamic sampling, update."""
import copy

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from gream_fast.generate import SIDConstraint
from gream_fast.index.semantic_index import SemanticIndex
from gream_fast.train.srpo import SRPOStepConfig, draw_groups, sid_trie, srpo_step

EOS, K, LEVELS, BASE = 2, 4, 2, 20


def setup(seed=0):
    cfg = Qwen3Config(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()
    codes = np.array([[a, b] for a in range(K) for b in range(K)])
    index = SemanticIndex.from_codes(codes, K)
    table = BASE + np.arange((LEVELS + 1) * K).reshape(LEVELS + 1, K)
    return model, SIDConstraint(index, token_table=table, eos_token_id=EOS)


def test_step_updates_the_policy_and_reports():
    model, con = setup()
    ref = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    before = [p.detach().clone() for p in model.parameters()]
    stats = srpo_step(model, ref, opt, prompts, [1, 5, 14], con, SRPOStepConfig(n=6), seed=0)
    assert stats["updated"] and np.isfinite(stats["loss"]) and stats["kept_groups"] >= 1
    assert 0 <= stats["reward_mean"] <= 1 and stats["response_len"] == LEVELS + 1
    assert abs(stats["kl"]) < 1e-6  # the policy starts at the reference
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_dynamic_sampling_drops_zero_variance_groups():
    model, con = setup(seed=1)
    prompts = [[3, 4], [5, 6]]
    # n = 1: every group has zero variance, so nothing is kept after max_draws draws
    _, _, rewards, _, draws = draw_groups(model, prompts, [0, 1], con,
                                          SRPOStepConfig(n=1, max_draws=3), seed=0)
    assert draws == 3 and len(rewards) == 0
    kept_p, kept_r, rewards, matches, _ = draw_groups(model, prompts, [0, 1], con,
                                                       SRPOStepConfig(n=8, groups=1), seed=0)
    assert len(kept_p) == 1 and len(kept_r[0]) == 8 and len(rewards) == 8
    assert rewards.unique().numel() > 1  # a kept group has variance
    # rewards follow METHOD.md: exact 1.0, else by the shared prefix
    assert all(r[-1] == EOS for r in kept_r[0])  # responses are SID + EOS
    items = con.trie.lookup(np.array(kept_r[0]))
    target = 0 if kept_p[0] == [3, 4] else 1
    for item, rw, m in zip(items, rewards.tolist(), matches.tolist()):
        assert rw == (1.0 if item == target else [0.0, 0.5, 0.707][m])
    assert sid_trie(con).num_items == con.num_items


def test_extra_draws_take_fresh_prompts():
    model, con = setup(seed=2)
    asked = []

    def more(draw):
        asked.append(draw)
        return [[7, 8, draw]], [3]

    # n = 1 never has variance: every draw is taken, the later ones from `more`
    draw_groups(model, [[3, 4]], [0], con, SRPOStepConfig(n=1, max_draws=3), seed=0, more=more)
    assert asked == [1, 2]


def test_sid_scored_logprobs_normalise_over_the_level():
    from gream_fast.train.group_pack import pack_groups, response_hidden
    from gream_fast.train.srpo import response_logprobs

    model, con = setup(seed=3)
    prompts = [[3, 4, 5], [6, 7]]
    responses = [[[BASE + 1, BASE + K + 2, EOS], [BASE + 3, BASE + K, EOS]], [[BASE, BASE + K + 3, EOS]]]
    batch = pack_groups(prompts, responses)
    got = response_logprobs(model, batch, con, score="sid")
    got.sum().backward()  # differentiable
    with torch.no_grad():
        h = response_hidden(model, batch)
        w = model.lm_head.weight
        for m in range(len(got)):
            d, t = int(batch.depth[m]), int(batch.target[m])
            if t == EOS:
                assert float(got[m]) == 0.0
                continue
            level = con.level_rows(d)
            want = torch.log_softmax(h[m] @ w[level].T, -1)[t - level.start]
            assert abs(float(got[m]) - float(want)) < 1e-5
