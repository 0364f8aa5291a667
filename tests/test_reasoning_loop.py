"""The device-side reasoning loop (generate.reasoning.reason_rows) against the per-row Python loop
it replaced, kept here as the oracle: the same rows, token for token, with the same seed. The
oracle finds the marker by decoding each row's tail with the tokenizer (the old way); the loop by
its token automaton. Both draw their samples the same way (one draw over every row still in
the batch each step, think tokens then answer tokens), which the loop needs to stay free of
host syncs; so the oracle is the old logic with the loop's sampling, and the comparison checks
the phases, the forced marker, the marker found however BPE split it, the answer under the trie,
the log-probs and the rows leaving the batch. A model biased towards the marker's pieces and a
stop token makes every path happen: the marker written (split or whole), a stop replaced by the
marker, the budget running out."""
import random

import numpy as np
import pytest
import torch

from gream_fast.generate import SIDConstraint
from gream_fast.generate.beam import step_candidates
from gream_fast.generate.reasoning import (ANSWER, FORCE, THINK, _stops, reason_rows,
                                           sample_logits, think)
from gream_fast.kernels.trie_logits import sample_children
from gream_fast.model import DecoderRunner

from tiny_data import make_data_and_index

pytestmark = pytest.mark.usefixtures("torch_kernels")  # the loop's logic, not the kernels'

SHAPE = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16, intermediate_size=64)


def oracle(runner, prompts, answer_ids, budget, temperature, top_p, eos_token_id, seed,
           tokenizer, answer, n, constraint, logprob_temperature=1.0):
    """The old loop: rows as Python lists, the marker found in the decoded text of each row's
    tail every step, finished rows leaving the batch at once."""
    m, dev, stops = len(answer_ids), runner.device, _stops(eos_token_id)
    gen = torch.Generator(device=dev).manual_seed(seed)
    R = len(prompts) * n
    toks_out, lps_out = [[] for _ in range(R)], [[] for _ in range(R)]
    forced, sid_start, items, stopped = [False] * R, [-1] * R, [-1] * R, [False] * R
    cap = budget + (m + constraint.max_len if constraint is not None else 0)
    hidden, state = runner.prefill(prompts, n, max(cap, 1))
    hidden = hidden.repeat_interleave(n, 0)
    rows = list(range(R))
    phase, fpos = [THINK] * R, [0] * R
    depth, nodes = [0] * R, torch.zeros(R, dtype=torch.int32)
    marker = torch.tensor(answer_ids)
    step = 0
    while True:
        if step == budget and constraint is not None:
            for j in range(len(rows)):
                if phase[j] == THINK:
                    forced[rows[j]], phase[j] = True, FORCE
        logits = runner.logits(hidden)
        tok = sample_logits(logits, temperature, top_p, gen)
        lp = torch.zeros(len(rows))
        answering = []
        if constraint is not None:
            for j in range(len(rows)):
                if phase[j] == THINK and int(tok[j]) in stops:
                    phase[j], fpos[j], stopped[rows[j]] = FORCE, 0, True
            for j in range(len(rows)):
                if phase[j] == FORCE:
                    tok[j] = marker[fpos[j]]
            lp = torch.log_softmax(logits / logprob_temperature, -1).gather(1, tok[:, None])[:, 0]
            answering = [j for j in range(len(rows)) if phase[j] == ANSWER]
        if answering:  # (the loop asks first on a CPU)
            at_root = torch.tensor([int(nodes[j]) if phase[j] == ANSWER else 0
                                    for j in range(len(rows))], dtype=torch.int32)
            s, t, c = step_candidates(runner, hidden, at_root, constraint, 0,
                                      constraint.max_children, "full", logprob_temperature)
            _, at, ac, al = sample_children(s, t, c, temperature / logprob_temperature, top_p,
                                            generator=gen, check=False)
            for j in answering:
                tok[j], lp[j], nodes[j] = at[j], al[j], ac[j]
        done = [False] * len(rows)
        for j, r in enumerate(rows):
            toks_out[r].append(int(tok[j]))
            lps_out[r].append(float(lp[j]))
        for j, r in enumerate(rows):
            if phase[j] != THINK:
                continue
            tail = tokenizer.decode(toks_out[r][-2 * m - 2:])
            if constraint is None:
                if answer in tail:
                    sid_start[r] = len(toks_out[r])
                done[j] = answer in tail or toks_out[r][-1] in stops
            elif answer in tail:
                phase[j], sid_start[r] = ANSWER, len(toks_out[r])
        if constraint is not None:
            for j, r in enumerate(rows):
                if phase[j] == FORCE:
                    fpos[j] += 1
                    if fpos[j] == m:
                        phase[j], sid_start[r] = ANSWER, len(toks_out[r])
                elif j in answering:
                    depth[j] += 1
                    if toks_out[r][-1] == constraint.eos_token_id:
                        done[j] = True
                        items[r] = int(constraint.items_of_nodes(nodes[j:j + 1])[0])
        if constraint is None and step == budget - 1:
            break
        if all(done):
            break
        if any(done):
            keep = [j for j in range(len(rows)) if not done[j]]
            state.select(torch.tensor(keep))
            rows = [rows[j] for j in keep]
            phase, fpos = [phase[j] for j in keep], [fpos[j] for j in keep]
            depth, nodes = [depth[j] for j in keep], nodes[keep]
            tok, hidden = tok[keep], hidden[keep]
        hidden = runner.decode(tok, state)
        step += 1
    return toks_out, lps_out, forced, sid_start, items, stopped


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random tiny Qwen3 with a byte-level BPE that tokenizes the marker as "<", "answer", ">"
    alone but " <", "answer", ">" in running text (as Qwen's does), leaning towards those pieces
    and the stop token so that every path of the loop happens."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from gream_fast.index.tokens import add_sid_tokens
    from gream_fast.model.tiny import train_tokenizer

    _, index = make_data_and_index(tmp_path_factory.mktemp("loop"))
    rng = random.Random(0)
    words = "the user bought a guitar then strings next item is recommended tuner".split()
    tok = train_tokenizer([" ".join(rng.choices(words, k=8)) + rng.choice(
        [" <answer>", "<answer>", "x<answer>"]) + " ok" for _ in range(400)], vocab_size=420)
    add_sid_tokens(tok, index=index)
    answer_ids = tok("<answer>", add_special_tokens=False)["input_ids"]
    in_text = tok(" <answer>", add_special_tokens=False)["input_ids"]
    assert len(answer_ids) > 1 and in_text[-len(answer_ids):] != answer_ids
    end = tok("</answer>", add_special_tokens=False)["input_ids"][0]
    constraint = SIDConstraint(index, tok, eos_token_id=end)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(Qwen3Config(vocab_size=len(tok), **SHAPE,
                                                         tie_word_embeddings=False))
    runner = DecoderRunner(model.float().eval())
    bias = torch.zeros(len(tok))
    bias[sorted(set(answer_ids + in_text))] = 8.0
    bias[tok.eos_token_id] = 5.0
    logits = runner.logits
    runner.logits = lambda h, rows=None: logits(h, rows) + (bias if rows is None else bias[rows])
    prompts = [tok(text)["input_ids"] for text in ("the user bought", "a guitar and strings",
                                                   "next item is")]
    return runner, tok, constraint, answer_ids, prompts


@pytest.mark.parametrize("top_p, lt", [(1.0, 1.0), (0.9, 0.7)])
def test_the_loop_equals_the_old_one(world, top_p, lt):
    runner, tok, constraint, answer_ids, prompts = world
    args = (runner, prompts, answer_ids, 16, 1.0, top_p, tok.eos_token_id, 4, tok, "<answer>", 5,
            constraint)
    got = reason_rows(*args, logprob_temperature=lt, sync_every=1)
    want = oracle(*args, logprob_temperature=lt)
    assert got.token_lists() == want[0]
    for row, lps in zip(got.logprobs.tolist(), want[1]):
        np.testing.assert_allclose(row[:len(lps)], lps, atol=1e-5)
    assert got.forced.tolist() == want[2] and got.sid_start.tolist() == want[3]
    assert got.items.tolist() == want[4] and min(want[4]) >= 0
    if top_p == 1:  # every path happened: the marker written and split by BPE (found in the
        # text), a stop token replaced by the marker (top_p 0.9 cuts the stop token), the
        # budget running out
        written = [not (f or st) for f, st in zip(want[2], want[5])]
        assert any(w and tokens[s - len(answer_ids):s] != answer_ids
                   for w, tokens, s in zip(written, want[0], want[3]))
        assert any(want[5]) and any(want[2])


def test_think_without_a_constraint_equals_the_old_loop(world):
    runner, tok, _, answer_ids, prompts = world
    args = (runner, prompts, answer_ids, 9, 1.0, 1.0, tok.eos_token_id, 2, tok, "<answer>", 4,
            None)
    got = reason_rows(*args, sync_every=1)
    want = oracle(*args)
    assert got.token_lists() == want[0] and got.sid_start.tolist() == want[3]
    out, forced = think(runner, prompts, answer_ids, 9, 1.0, 1.0, tok.eos_token_id, 2, tok,
                        "<answer>")
    assert len(out) == len(prompts) and all(r[-len(answer_ids):] == answer_ids or "<answer>" in
                                            tok.decode(r) for r in out)


def test_fewer_syncs_give_valid_seeded_rows(world):
    """With a sync every 8 steps finished rows stay a little longer (their draws change the
    stream), so the rows differ from sync_every=1, but are as valid, and seeded."""
    runner, tok, constraint, answer_ids, prompts = world
    args = (runner, prompts, answer_ids, 12, 1.0, 1.0, tok.eos_token_id, 7, tok, "<answer>", 6,
            constraint)
    a, b = reason_rows(*args, sync_every=8), reason_rows(*args, sync_every=8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    rows = a.token_lists()
    m = len(answer_ids)
    for r, s, item, f in zip(rows, a.sid_start.tolist(), a.items.tolist(), a.forced.tolist()):
        assert "<answer>" in tok.decode(r[:s]) and (not f or r[s - m:s] == answer_ids)
        assert len(r[:s - m]) <= 12 + 1 and r[-1] == constraint.eos_token_id
        assert constraint.trie.lookup(np.array([r[s:]]))[0] == item >= 0


def test_sid_scores_are_level_log_probs(world):
    """score="sid": an answer token's log-prob is normalised over its SID level (the closing
    token scores 0), the sampling distribution is the full score's."""
    runner, tok, constraint, answer_ids, prompts = world
    args = (runner, prompts[:1], answer_ids, 4, 1.0, 1.0, tok.eos_token_id, 5, tok, "<answer>",
            3, constraint)
    full, sid = reason_rows(*args), reason_rows(*args, score="sid")
    assert torch.equal(full.tokens, sid.tokens)
    k = constraint.token_table.shape[1]
    for r in range(len(full.tokens)):
        s, n = int(sid.sid_start[r]), int(sid.lengths[r])
        assert torch.equal(full.logprobs[r, :s], sid.logprobs[r, :s])
        assert sid.logprobs[r, n - 1] == 0  # the closing token after a complete SID
        assert (sid.logprobs[r, s:n - 1] > full.logprobs[r, s:n - 1]).all()  # the level only
        assert (sid.logprobs[r, s:n - 1] <= 0).all()
    assert k > 1


@pytest.mark.parametrize("vocab", [300, 4096])
def test_cpu_draws_follow_the_probabilities(vocab):
    """The CPU draw (two-level inverse CDF over blocks of CDF_BLOCK tokens, the last block
    ragged at vocab 300) gives token i with probability p_i: every count within 5 sigma of
    its expectation, and never a token of probability zero (every third one here, and all but
    one token of the rows whose mass sits in a single block's edge or the ragged tail)."""
    from gream_fast.generate.reasoning import CDF_BLOCK, _race

    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, vocab, generator=g) * 2
    logits[:, ::3] = -float("inf")
    logits[2, :] = -float("inf")
    logits[2, [CDF_BLOCK - 1, CDF_BLOCK]] = 0.0  # two tokens either side of a block edge
    logits[3, :] = -float("inf")
    logits[3, [vocab - 1]] = 0.0  # the very last token
    p = torch.softmax(logits, -1)
    draws, rows = 100_000, 2_000
    counts = torch.zeros(4, vocab)
    for _ in range(draws // rows):
        idx = _race(p.repeat(rows, 1), g).view(rows, 4)
        counts += torch.nn.functional.one_hot(idx.T, vocab).sum(1)
    assert counts[p == 0].sum() == 0
    expected = p * draws  # (+ 3: the rare tokens' counts are Poisson, not normal)
    assert ((counts - expected).abs() <= 5 * (expected * (1 - p)).sqrt() + 3).all()
    assert counts[3, vocab - 1] == draws
