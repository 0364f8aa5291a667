"""One SRPO step end to end on a tiny model: rollouts, rewards, dynamic sampling, update."""
import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from gream_fast import GreamError
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


def test_step_reports_the_rollouts_before_the_selection():
    """rollout_reward_mean / rollout_exact_rate are over every rollout of the first draw (the
    same seed's sample, rewarded independently here), kept_fraction and distinct_items
    describe what dynamic sampling kept; reward_mean is over the kept groups only."""
    from gream_fast.generate import sample
    from gream_fast.train.rewards import sid_reward

    model, con = setup(seed=3)
    ref = copy.deepcopy(model).eval()
    prompts, targets, n = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12, 13]], [1, 5, 14, 2], 4
    roll = sample(model, prompts, con, n=n, temperature=1.0, seed=0)
    pred = torch.where(roll.mask, roll.tokens, -1)
    reward, _ = sid_reward(pred, torch.tensor(targets).repeat_interleave(n), sid_trie(con),
                           eos_token_id=EOS)
    groups = reward.view(len(prompts), n)
    kept = [g for g in range(len(prompts)) if groups[g].unique().numel() > 1]
    assert 0 < len(kept) < len(prompts)  # the selection matters in this case
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = srpo_step(model, ref, opt, prompts, targets, con, SRPOStepConfig(n=n, max_draws=1),
                      seed=0)
    assert stats["rollout_reward_mean"] == pytest.approx(float(reward.mean()))
    assert stats["rollout_exact_rate"] == pytest.approx(float((reward == 1).float().mean()))
    assert stats["kept_groups"] == len(kept)
    assert stats["kept_fraction"] == pytest.approx(len(kept) / len(prompts))
    assert stats["reward_mean"] == pytest.approx(float(groups[kept].mean()))
    items = roll.items.view(len(prompts), n)
    assert stats["distinct_items"] == pytest.approx(
        np.mean([items[g].unique().numel() for g in kept]))


def test_bf16_autocast_step_agrees_with_float32():
    """bf16=True runs the log-prob passes under bfloat16 autocast (CPU autocast here): the
    rollouts and rewards are the float32 step's, the weights stay float32, and the update
    (plain SGD, so it is the gradient) points the same way."""
    prompts, targets = [[3, 4, 5], [6, 7], [8, 9, 10, 11]], [1, 5, 14]
    updates, stats = [], []
    for bf16 in (False, True):
        model, con = setup()
        ref = copy.deepcopy(model).eval()
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        stats.append(srpo_step(model, ref, opt, prompts, targets, con,
                               SRPOStepConfig(n=6, bf16=bf16), seed=0))
        assert all(p.dtype == torch.float32 for p in model.parameters())
        updates.append(torch.cat([(p.detach() - b).flatten()
                                  for p, b in zip(model.parameters(), before)]))
    assert stats[0]["updated"] and stats[1]["updated"]
    assert stats[0]["reward_mean"] == stats[1]["reward_mean"]
    assert stats[0]["kept_groups"] == stats[1]["kept_groups"]
    cos = torch.nn.functional.cosine_similarity(updates[0], updates[1], dim=0)
    assert updates[1].abs().sum() > 0 and cos > 0.95


def test_dynamic_sampling_drops_zero_variance_groups():
    model, con = setup(seed=1)
    prompts = [[3, 4], [5, 6]]
    # n = 1: every group has zero variance, so nothing is kept after max_draws draws
    got = draw_groups(model, prompts, [0, 1], con, SRPOStepConfig(n=1, max_draws=3), seed=0)
    assert got.draws == 3 and len(got.rewards) == 0 and got.groups_drawn == 6
    assert got.first_rollouts == 2  # the first draw's rewards, before any selection
    got = draw_groups(model, prompts, [0, 1], con, SRPOStepConfig(n=8, groups=1), seed=0)
    kept_p, kept_r, rewards, matches, starts = (got.prompts, got.responses, got.rewards,
                                                got.matches, got.sid_start)
    assert len(kept_p) == 1 and len(kept_r[0]) == 8 and len(rewards) == 8
    assert rewards.unique().numel() > 1  # a kept group has variance
    assert starts.tolist() == [0] * 8  # direct mode: the response is the SID
    # rewards follow METHOD.md: exact 1.0, else by the shared prefix
    assert all(r[-1] == EOS for r in kept_r[0])  # responses are SID + EOS
    items = con.trie.lookup(np.array(kept_r[0]))
    target = 0 if kept_p[0] == [3, 4] else 1
    for item, rw, m in zip(items, rewards.tolist(), matches.tolist()):
        assert rw == (1.0 if item == target else [0.0, 0.5, 0.707][m])
    assert got.distinct_items == len(set(items.tolist()))
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


# -- reasoning mode ---------------------------------------------------------------------------
MARKER, STOP = [7, 8], 3  # the answer marker's ids; a token that ends a turn


def reasoning_rollouts(model, con, prompts, n, seed, budget=5, score="full"):
    from gream_fast.generate import sample

    return sample(model, prompts, con, n=n, mode="reasoning", think_budget=budget,
                  answer_ids=MARKER, stop_ids=[STOP], seed=seed, score=score)


def test_reasoning_sample_is_seeded_real_and_reports_the_policy_logprobs():
    model, con = setup(seed=4)
    prompts, n, budget = [[3, 4, 5], [6, 9]], 4, 5
    a = reasoning_rollouts(model, con, prompts, n, seed=1, budget=budget)
    b = reasoning_rollouts(model, con, prompts, n, seed=1, budget=budget)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, reasoning_rollouts(model, con, prompts, n, seed=2).tokens)
    assert torch.equal(a.prompt, torch.arange(2).repeat_interleave(n))
    for r in range(len(a.tokens)):
        toks, s = a.tokens[r][a.mask[r]].tolist(), int(a.sid_start[r])
        # text, then the marker (forced only when the budget ran out), the SID, the end token
        assert toks[s - 2:s] == MARKER and STOP not in toks[:s - 2]
        assert (s - 2 == budget) if a.forced[r] else (s - 2 <= budget)
        assert toks[-1] == EOS and EOS not in toks[s:-1]
        assert con.trie.lookup(np.array([toks[s:]]))[0] == int(a.items[r]) >= 0
        # each token's log-prob: the model's full-vocabulary log-softmax after prompt + prefix
        with torch.no_grad():
            logits = model(torch.tensor([prompts[r // n] + toks])).logits[0]
        lp = torch.log_softmax(logits[len(prompts[r // n]) - 1:-1], -1)
        want = lp[torch.arange(len(toks)), torch.tensor(toks)]
        torch.testing.assert_close(a.logprobs[r][a.mask[r]], want, atol=1e-5, rtol=0)
    assert a.forced.any()  # a random model rarely writes the marker itself


def test_reasoning_logprobs_text_full_and_sid_per_score():
    from gream_fast.train.group_pack import pack_groups
    from gream_fast.train.srpo import response_logprobs

    model, con = setup(seed=5)
    prompts = [[3, 4, 5], [6, 9]]
    roll = reasoning_rollouts(model, con, prompts, 3, seed=0, budget=4)
    resp = [roll.tokens[r][roll.mask[r]].tolist() for r in range(len(roll.tokens))]
    batch = pack_groups(prompts, [resp[:3], resp[3:]])
    full = response_logprobs(model, batch, con, "full", roll.sid_start)
    sid = response_logprobs(model, batch, con, "sid", roll.sid_start)
    full.sum().backward()  # differentiable through the chunked path
    at = 0
    for r, toks in enumerate(resp):
        s = int(roll.sid_start[r])
        with torch.no_grad():
            h = model.model(torch.tensor([prompts[r // 3] + toks])).last_hidden_state[0]
        h = h[len(prompts[r // 3]) - 1:-1]
        w = model.lm_head.weight.detach()
        lp = torch.log_softmax(h @ w.T, -1)[torch.arange(len(toks)), torch.tensor(toks)]
        torch.testing.assert_close(full[at:at + len(toks)].detach(), lp, atol=1e-5, rtol=0)
        want = lp.clone()  # score="sid": text as full; SID over its level; the end token 0
        for j in range(s, len(toks)):
            rows = con.level_rows(j - s)
            want[j] = 0.0 if toks[j] == EOS else torch.log_softmax(h[j] @ w[rows].T, -1)[
                toks[j] - rows.start]
        torch.testing.assert_close(sid[at:at + len(toks)].detach(), want, atol=1e-5, rtol=0)
        at += len(toks)


def test_reasoning_step_updates_the_policy_and_gates_the_reward():
    from gream_fast.train.rewards import ThinkFormat

    model, con = setup(seed=6)
    prompts, n, seed = [[3, 4, 5], [6, 9]], 4, 3
    cfg = SRPOStepConfig(n=n, mode="reasoning", think_budget=5, max_draws=1)
    # the rollouts srpo_step will draw first (the same seed): take the think markers from row
    # 0's text, so row 0 is well formed, and make its item prompt 0's target (reward 1.0)
    roll = reasoning_rollouts(model, con, prompts, n, seed=seed, budget=5)
    text = roll.tokens[0][:int(roll.sid_start[0]) - 2].tolist()
    fmt = ThinkFormat(answer=MARKER, think_open=text[:1], think_close=text[-1:], stop=(STOP,))
    targets = [int(roll.items[0]), int(roll.items[n])]
    got = draw_groups(model, prompts, targets, con, cfg, seed, fmt=fmt)
    resp, rewards, starts = got.responses, got.rewards, got.sid_start
    assert resp[0][0] == roll.tokens[0][roll.mask[0]].tolist() and rewards[0] == 1.0
    assert torch.equal(starts[:n], roll.sid_start[:n])
    for r, toks in enumerate(sum(resp, [])):  # a reward > 0 needs the think block
        if rewards[r] > 0:
            s = int(starts[r])
            o = toks.index(fmt.think_open[0])
            assert fmt.think_close[0] in toks[o + 1:s - 2]
    ref = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    stats = srpo_step(model, ref, opt, prompts, targets, con, cfg, seed=seed, fmt=fmt)
    assert stats["updated"] and stats["kept_groups"] >= 1
    assert all(np.isfinite(stats[k]) for k in ("loss", "grad_norm", "reward_mean", "kl"))
    assert stats["response_len"] > LEVELS + 1 and abs(stats["kl"]) < 1e-6
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_packs_and_checkpointing_give_the_whole_steps_update():
    """srpo_update over packs of at most a token budget (each pack's loss backpropagated in
    turn) and with gradient checkpointing gives the one-pass update: the same loss and the
    same gradient step (plain SGD: the weights move by the gradient)."""
    from gream_fast.train.srpo import srpo_update

    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    g = torch.Generator().manual_seed(0)
    responses = [[[int(t) for t in torch.randint(BASE, BASE + K, (2,), generator=g)] + [EOS]
                  for _ in range(4)] for _ in prompts]
    rewards = torch.tensor([1.0, 0.5, 0.0, 0.707] * 3)
    starts = torch.zeros(12, dtype=torch.int64)
    results = []
    for budget, ckpt in ((0, False), (9, False), (14, True), (3, False)):
        model, con = setup(seed=2)
        ref = copy.deepcopy(model).eval()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        before = [p.detach().clone() for p in model.parameters()]
        st = srpo_update(model, ref, opt, prompts, responses, rewards, starts, con,
                         SRPOStepConfig(n=4, token_budget=budget, checkpointing=ckpt))
        step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
        results.append((st, step))
    (one, base), *rest = results
    assert one["packs"] == 1 and [r[0]["packs"] for r in rest] == [8, 5, 12]  # groups split
    for st, step in rest:
        assert abs(st["loss"] - one["loss"]) < 1e-6 and st["tokens"] >= one["tokens"]
        torch.testing.assert_close(step, base, atol=1e-6, rtol=1e-5)


def test_checkpointing_recomputes_even_in_eval_mode():
    """A policy straight from sampling (or from_pretrained) is in eval mode, where transformers
    would not checkpoint: checkpointing() still makes the pass keep only the layers' inputs
    (far fewer saved elements), changes no log-prob, and leaves every module's mode as it was."""
    from gream_fast.train.group_pack import pack_groups, packed_pass_mode
    from gream_fast.train.srpo import checkpointing, response_logprobs

    model, con = setup(seed=3)
    model.eval()
    batch = pack_groups([[3, 4, 5, 6], [7, 8]], [[[BASE, BASE + K + 1, EOS]] * 3] * 2)
    starts = torch.zeros(6, dtype=torch.int64)
    saved, logps = {}, {}
    for on in (False, True):
        sizes = []
        with checkpointing(model, on), packed_pass_mode(model), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t,
                                                         lambda t: t):
            logps[on] = response_logprobs(model, batch, con, "full", starts)
            logps[on].sum().backward()
        saved[on] = sum(sizes)
    assert saved[True] < saved[False] / 2
    torch.testing.assert_close(logps[True], logps[False])
    assert not any(m.training for m in model.modules())


def test_mini_batches_clip_against_the_rollout_policy(monkeypatch):
    """mini_batches=2 on 4 fixed groups: two optimizer steps, on groups 0-1 then 2-3, each
    normalised by its own tokens; the old log-probs of both are the rollout policy's (an
    independent pass of a frozen copy): the first update's ratio is 1, the second's is not, and
    with a large step the clip acts there."""
    from gream_fast.train import srpo
    from gream_fast.train.group_pack import pack_groups
    from gream_fast.train.srpo import response_logprobs, srpo_update

    model, con = setup(seed=4)
    rollout_policy = copy.deepcopy(model).eval()
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12, 13]]
    responses = [[[20, 24, 2], [21, 25, 2], [23, 27, 2]], [[22, 26, 2], [21, 24, 2], [20, 25, 2]],
                 [[21, 27, 2], [23, 24, 2], [22, 25, 2]], [[20, 26, 2], [21, 24, 2], [22, 27, 2]]]
    rewards = torch.tensor([1.0, 0.5, 0.0, 0.707, 0.0, 0.5, 0.0, 1.0, 0.5, 1.0, 0.0, 0.0])
    calls = []
    real_loss = srpo.srpo_loss

    def spy(logp, old, adv, mask, ref, cfg, normalizer):
        calls.append((logp.detach().clone(), old.clone(), normalizer))
        return real_loss(logp, old, adv, mask, ref, cfg, normalizer)

    monkeypatch.setattr(srpo, "srpo_loss", spy)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    stats = srpo_update(model, copy.deepcopy(model).eval(), opt, prompts, responses, rewards,
                        torch.zeros(12, dtype=torch.int64), con,
                        SRPOStepConfig(n=3, mini_batches=2, clip_grad=10.0))
    assert stats["updates"] == 2 and len(calls) == 2
    for (logp, old, normalizer), half in zip(calls, (slice(0, 2), slice(2, 4))):
        want = response_logprobs(rollout_policy, pack_groups(prompts[half], responses[half]))
        torch.testing.assert_close(old, want.detach(), atol=1e-5, rtol=1e-5)
        assert normalizer == len(want)  # each mini-batch's own token mean (3 tokens a response)
    assert torch.equal(calls[0][0], calls[0][1])  # before any update: the ratio is exactly 1
    ratio = (calls[1][0] - calls[1][1]).exp()
    assert (ratio - 1).abs().max() > 0.2  # the first update moved the second half's log-probs
    assert stats["clip_fraction"] > 0  # ... past the clip, which now acts
    assert 0 < stats["grad_norm"] and stats["tokens"] == sum(
        pack_groups(prompts[h], responses[h]).num_tokens for h in (slice(0, 2), slice(2, 4)))


def test_beam_rollouts_are_the_n_best_distinct_items():
    """rollout="beam": each group is the n best distinct items of the constrained beam search
    (its token sequences, SID + EOS), rewarded as sampled ones are; a step on them updates
    the policy; reasoning mode refuses it."""
    from gream_fast.generate import beam_search
    from gream_fast.model import make_runner

    model, con = setup(seed=5)
    prompts, targets, n = [[3, 4, 5], [6, 7]], [1, 9], 5
    cfg = SRPOStepConfig(n=n, rollout="beam", max_draws=1)
    got = draw_groups(model, prompts, targets, con, cfg, seed=0)
    res = beam_search(make_runner(model), prompts, con, n, n)
    kept = [prompts.index(p) for p in got.prompts]
    assert kept and got.draws == 1
    for g, responses in zip(kept, got.responses):
        want = [t[t >= 0].tolist() for t in res.tokens[g]]
        assert responses == want and all(r[-1] == EOS for r in responses)
        items = con.trie.lookup(np.array(responses))
        assert items.tolist() == res.items[g].tolist() and len(set(items.tolist())) == n
    reward, _ = sid_reward_of(got.responses, [targets[g] for g in kept], con)
    assert torch.equal(got.rewards, reward)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    stats = srpo_step(model, copy.deepcopy(model).eval(), opt, prompts, targets, con, cfg)
    assert stats["updated"] == bool(kept) and stats["distinct_items"] == n
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(GreamError, match="rollout"):
        draw_groups(model, prompts, targets, con,
                    SRPOStepConfig(n=n, rollout="beam", mode="reasoning"), seed=0, fmt=object())


def sid_reward_of(responses, targets, con):
    from gream_fast.train.rewards import sid_reward

    rows = [r for group in responses for r in group]
    pred = torch.full((len(rows), max(map(len, rows))), -1)
    for i, r in enumerate(rows):
        pred[i, :len(r)] = torch.tensor(r)
    n = len(responses[0])
    return sid_reward(pred, torch.tensor(targets).repeat_interleave(n), sid_trie(con),
                      eos_token_id=EOS)


def test_per_level_credit_advantages(monkeypatch):
    """credit="level": each token's advantage is the group advantage, at its depth, of the
    responses' per-level credits (train.rewards.level_credit), the end tokens a depth of their
    own; a wrong item's tokens after its matched prefix get the advantage of credit 0."""
    from gream_fast.kernels import group_advantage
    from gream_fast.train import srpo
    from gream_fast.train.rewards import level_credit
    from gream_fast.train.srpo import srpo_update

    model, con = setup(seed=6)
    prompts = [[3, 4, 5], [6, 7]]
    # 2 levels of K=4 codes, tokens BASE + level * K + code; target of group 0: codes (1, 2),
    # of group 1: (0, 3)
    t = [[BASE + 1, BASE + K + 2], [BASE + 0, BASE + K + 3]]
    responses = [[t[0] + [EOS], [BASE + 1, BASE + K + 0, EOS], [BASE + 3, BASE + K + 2, EOS],
                  [BASE + 1, BASE + K + 1, EOS]],
                 [t[1] + [EOS], t[1] + [EOS], [BASE + 2, BASE + K + 3, EOS]]]
    matches = torch.tensor([2, 1, 0, 1, 2, 2, 0])
    rewards = torch.tensor([1.0, 0.5, 0.0, 0.5, 1.0, 1.0, 0.0])
    seen = []
    real_loss = srpo.srpo_loss

    def spy(logp, old, adv, mask, ref, cfg, normalizer):
        seen.append(adv.clone())
        return real_loss(logp, old, adv, mask, ref, cfg, normalizer)

    monkeypatch.setattr(srpo, "srpo_loss", spy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    srpo_update(model, None, opt, prompts, responses, rewards, torch.zeros(7, dtype=torch.int64),
                con, SRPOStepConfig(n=4, credit="level"), matches=matches)
    credit = level_credit([3] * 7, [True] * 7, matches, rewards == 1.0)
    assert credit[1].tolist() == [0.5, 0.0, 0.0]  # the cluster, then nothing for the wrong code
    want = []
    for rows in (range(0, 4), range(4, 7)):
        per_depth = [group_advantage(credit[list(rows), d], torch.zeros(len(rows), dtype=torch.long))
                     for d in range(3)]
        want += [per_depth[d][i] for i in range(len(rows)) for d in range(3)]
    torch.testing.assert_close(seen[0], torch.stack(want))
    with pytest.raises(GreamError, match="credit"):
        draw_groups(model, prompts, [0, 1], con,
                    SRPOStepConfig(n=4, credit="level", mode="reasoning"), seed=0, fmt=object())


def test_rank_reward_of_beam_groups():
    """reward="rank": in a beam group that holds the target, each wrong item at beam rank i
    loses (1 / log2(i + 1)) / sum_j (1 / log2(j + 1)); groups without it are unchanged; it needs
    beam rollouts."""
    from gream_fast.train.rewards import rank_rewards

    w = np.array([1 / np.log2(i + 1) for i in range(1, 5)])
    w /= w.sum()
    exact = torch.tensor([False, False, True, False, False, False, False, False])
    np.testing.assert_allclose(rank_rewards(exact, 4).numpy(), [-w[0], -w[1], 0, -w[3], 0, 0, 0, 0],
                               rtol=1e-6)
    model, con = setup(seed=5)
    prompts, n = [[3, 4, 5], [6, 7]], 5
    # the targets: an item inside group 0's beams (at rank 3), one outside group 1's
    from gream_fast.generate import beam_search
    from gream_fast.model import make_runner

    res = beam_search(make_runner(model), prompts, con, n, n)
    outside = next(i for i in range(con.num_items) if i not in res.items[1].tolist())
    targets = [int(res.items[0, 2]), outside]
    plain = draw_groups(model, prompts, targets, con, SRPOStepConfig(n=n, rollout="beam"), seed=0)
    ranked = draw_groups(model, prompts, targets, con,
                         SRPOStepConfig(n=n, rollout="beam", reward="rank"), seed=0)
    assert plain.prompts == ranked.prompts == prompts  # both groups have reward variance
    w = np.array([1 / np.log2(i + 1) for i in range(1, n + 1)])
    w /= w.sum()
    want = plain.rewards.numpy().copy()
    want[[0, 1, 3, 4]] -= w[[0, 1, 3, 4]]
    np.testing.assert_allclose(ranked.rewards.numpy(), want, rtol=1e-6)
    assert ranked.rewards[2] == 1.0
    with pytest.raises(GreamError, match="reward"):
        draw_groups(model, prompts, targets, con, SRPOStepConfig(n=n, reward="rank"), seed=0)
