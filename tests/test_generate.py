"""The decoder runner against the HF forward, and trie-constrained beam search against HF
`generate` with an exact trie in prefix_allowed_tokens_fn, on small random float32 models of
the three families we run (Qwen3, Qwen2, Llama)."""
import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LogitsProcessorList, Qwen2Config,
                          Qwen3Config)

from gream_fast import GreamError
from gream_fast.generate import SIDConstraint, beam_search, recommend, sample
from gream_fast.generate.hf import SIDLogitsProcessor
from gream_fast.index.semantic_index import SemanticIndex
from gream_fast.model import DecoderRunner, HFRunner

VOCAB, EOS, PAD, SID_BASE = 160, 2, 0, 40
LEVELS, K = 3, 8  # SID tokens: (LEVELS + 1) x K ids from SID_BASE


def tiny(family, seed=0):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False, initializer_range=0.15, eos_token_id=EOS,
                  pad_token_id=PAD)
    cfg = {"qwen3": lambda: Qwen3Config(head_dim=16, **common),
           "qwen2": lambda: Qwen2Config(**common),
           "llama": lambda: LlamaConfig(attention_bias=True, **common)}[family]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().eval()
    if family == "llama":  # attention_bias: make the biases non-zero so they are exercised
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.1)
                layer.self_attn.k_proj.bias.normal_(0, 0.1)
    return model


def random_prompts(n, seed, lo=3, hi=12):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, SID_BASE, (m,), generator=g).tolist() for m in lens]


def make_constraint(n_items=90, seed=0):
    """Random codes with some collisions (so SIDs have LEVELS or LEVELS + 1 tokens)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, K, size=(n_items, LEVELS))
    codes[1] = codes[0]  # a collision group
    codes[7] = codes[5]
    index = SemanticIndex.from_codes(codes, K)
    table = SID_BASE + np.arange((LEVELS + 1) * K).reshape(LEVELS + 1, K)
    return SIDConstraint(index, token_table=table, eos_token_id=EOS)


def hf_last_logits(model, seqs):
    return torch.stack([model(torch.tensor([s])).logits[0, -1] for s in seqs])


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_runner_matches_hf_forward(family):
    model = tiny(family)
    runner = DecoderRunner(model)
    prompts = random_prompts(4, seed=1)
    rows = 3
    with torch.no_grad():
        hidden, state = runner.prefill(prompts, rows, suffix_capacity=4)
        torch.testing.assert_close(runner.logits(hidden), hf_last_logits(model, prompts),
                                   atol=1e-5, rtol=1e-5)
        g = torch.Generator().manual_seed(2)
        generated = [[] for _ in range(len(prompts) * rows)]
        for step in range(4):
            if step == 2:  # beams reorder: row r continues row parents[r] of the same prompt
                parents = torch.tensor([p * rows + (r + 1) % rows for p in range(len(prompts))
                                        for r in range(rows)])
                state.reorder(parents)
                generated = [list(generated[i]) for i in parents.tolist()]
            tokens = torch.randint(3, VOCAB, (len(generated),), generator=g)
            for r, t in enumerate(tokens.tolist()):
                generated[r].append(t)
            hidden = runner.decode(tokens, state)
            seqs = [prompts[r // rows] + generated[r] for r in range(len(generated))]
            torch.testing.assert_close(runner.logits(hidden), hf_last_logits(model, seqs),
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_runner_follows_weight_updates(family):
    """The runner's fused q/k/v and gate/up weights are copies: an optimizer step (in place)
    and a load_state_dict must both reach its next prefill and decode."""
    model = tiny(family)
    runner = DecoderRunner(model)
    prompts = random_prompts(3, seed=4)
    runner.prefill(prompts, 1, suffix_capacity=2)  # builds the fused copies
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.tensor([prompts[0]])).logits.square().mean().backward()
    opt.step()
    other = tiny(family, seed=9).state_dict()
    for update in ("step", "load"):
        if update == "load":
            model.load_state_dict(other)
        with torch.no_grad():
            hidden, state = runner.prefill(prompts, 1, suffix_capacity=2)
            torch.testing.assert_close(runner.logits(hidden), hf_last_logits(model, prompts),
                                       atol=1e-5, rtol=1e-5)
            tokens = torch.tensor([5, 6, 7])
            seqs = [p + [t] for p, t in zip(prompts, tokens.tolist())]
            torch.testing.assert_close(runner.logits(runner.decode(tokens, state)),
                                       hf_last_logits(model, seqs), atol=1e-5, rtol=1e-5)


def test_static_decode_updates_buffers_in_place_through_reorder_and_select():
    # The decode step reads and advances only buffers sized at prefill (what a CUDA graph
    # needs): after reorder, select (rows of prompt 1 all leave, prompt 0 keeps 2 of 3) and
    # more steps, the logits still equal HF's and no buffer was reallocated.
    model = tiny("qwen3", seed=3)
    runner = DecoderRunner(model)
    prompts = random_prompts(3, seed=4)
    rows = 3
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        _, state = runner.prefill(prompts, rows, suffix_capacity=5)
        buffers = (state.suffix_k, state.suffix_v, state.tokens, state.lens, state.start_pos,
                   state.row_cu, state.rope_cos)
        ptrs = [b.data_ptr() for b in buffers]
        live = list(range(len(prompts) * rows))  # original row of each live row
        generated = [[] for _ in live]
        for step in range(5):
            if step == 2:
                state.reorder(torch.tensor([1, 1, 0, 3, 4, 5, 8, 6, 7]))
                generated = [list(generated[i]) for i in [1, 1, 0, 3, 4, 5, 8, 6, 7]]
            if step == 3:
                keep = torch.tensor([0, 2, 6, 7, 8])
                state.select(keep)
                live = [live[i] for i in keep.tolist()]
                generated = [generated[i] for i in keep.tolist()]
                assert state.rows == 5 and state.row_cu.tolist() == [0, 2, 2, 5]
            tokens = torch.randint(3, VOCAB, (state.rows,), generator=g)
            for r, t in enumerate(tokens.tolist()):
                generated[r].append(t)
            hidden = runner.decode(tokens, state)
            assert state.lens[:state.rows].tolist() == [step + 1] * state.rows
            seqs = [prompts[live[r] // rows] + generated[r] for r in range(len(live))]
            torch.testing.assert_close(runner.logits(hidden), hf_last_logits(model, seqs),
                                       atol=1e-5, rtol=1e-5)
        assert [b.data_ptr() for b in buffers] == ptrs
        with pytest.raises(GreamError, match="suffix capacity 5 is full"):
            runner.decode(tokens, state)
        state.rewind(4)
        with pytest.raises(GreamError, match=r"one token per live row \(5\)"):
            runner.decode(tokens[:4], state)


def hf_generate(model, prompts, constraint, num_beams, top_k, length_penalty=1.0,
                early_stopping=False, processor=False):
    """HF beam search with the exact trie as prefix_allowed_tokens_fn (the users' baseline), or
    with our SIDLogitsProcessor (processor=True)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    trie = constraint.trie

    def allowed(_, seq):
        nxt = trie.allowed(seq[width:].tolist()).tolist()
        return nxt or [EOS]  # only beams already past EOS (score -1e9) get here

    how = ({"logits_processor": LogitsProcessorList([SIDLogitsProcessor(constraint, width)])}
           if processor else {"prefix_allowed_tokens_fn": allowed})
    ids, mask = ids.to(model.device), mask.to(model.device)
    out = model.generate(input_ids=ids, attention_mask=mask, num_beams=num_beams,
                         num_return_sequences=top_k, max_new_tokens=constraint.max_len,
                         do_sample=False, **how,
                         length_penalty=length_penalty, early_stopping=early_stopping,
                         return_dict_in_generate=True, output_scores=True,
                         eos_token_id=EOS, pad_token_id=PAD)
    gen = out.sequences[:, width:].cpu()
    after = (gen == EOS).cumsum(1) - (gen == EOS).int() > 0  # tokens after the first EOS
    gen[after] = -1
    items = torch.as_tensor(trie.lookup(gen.numpy())).view(len(prompts), top_k)
    return items, out.sequences_scores.cpu().view(len(prompts), top_k)


@pytest.mark.parametrize("family,num_beams,top_k,penalty,early", [
    ("qwen3", 10, 10, 1.0, False),
    ("qwen2", 6, 4, 1.0, False),
    ("llama", 8, 5, 0.5, True),
])
def test_beam_search_matches_hf_generate(family, num_beams, top_k, penalty, early):
    model = tiny(family, seed=3)
    constraint = make_constraint()
    prompts = random_prompts(5, seed=4)
    ours = beam_search(DecoderRunner(model), prompts, constraint, num_beams, top_k,
                       length_penalty=penalty, early_stopping=early)
    items, scores = hf_generate(model, prompts, constraint, num_beams, top_k, penalty, early)
    assert (items >= 0).all()
    assert torch.equal(ours.items, items)
    torch.testing.assert_close(ours.scores, scores, atol=1e-4, rtol=0)


def test_logits_processor_is_a_drop_in_for_the_trie_callback():
    model = tiny("qwen3", seed=15)
    constraint = make_constraint(seed=6)
    prompts = random_prompts(3, seed=16)
    items, scores = hf_generate(model, prompts, constraint, 6, 6)
    items2, scores2 = hf_generate(model, prompts, constraint, 6, 6, processor=True)
    assert torch.equal(items, items2) and (items >= 0).all()
    torch.testing.assert_close(scores, scores2, atol=1e-6, rtol=0)


def test_results_are_real_distinct_items_and_hf_runner_agrees():
    model = tiny("qwen3", seed=5)
    constraint = make_constraint(seed=1)
    prompts = random_prompts(3, seed=6)
    ours = beam_search(DecoderRunner(model), prompts, constraint, 10, 10)
    fallback = beam_search(HFRunner(model), prompts, constraint, 10, 10)
    assert torch.equal(ours.items, fallback.items)
    torch.testing.assert_close(ours.scores, fallback.scores, atol=1e-4, rtol=0)
    for row in ours.items.tolist():
        assert len(set(row)) == len(row) and min(row) >= 0
    # each returned token sequence spells its item, then EOS
    seqs = ours.tokens.view(-1, ours.tokens.shape[-1]).numpy()
    assert np.array_equal(constraint.trie.lookup(seqs), ours.items.view(-1).numpy())
    assert (ours.scores[:, :-1] >= ours.scores[:, 1:]).all()


def test_sid_scores_renormalise_over_the_level():
    model = tiny("qwen3", seed=7)
    constraint = make_constraint(seed=2)
    prompts = random_prompts(2, seed=8)
    res = beam_search(DecoderRunner(model), prompts, constraint, 6, 6, score="sid")
    runner = DecoderRunner(model)
    # recompute the best item's score by hand: sum over its SID tokens of log-softmax over that
    # level's K tokens, + 0 for EOS, divided by the number of generated tokens
    for b, p in enumerate(prompts):
        item = int(res.items[b, 0])
        toks = [t for t in res.tokens[b, 0].tolist() if t >= 0]
        total = 0.0
        for depth, tok in enumerate(toks[:-1]):
            rows = constraint.level_rows(depth)
            with torch.no_grad():
                hidden = runner.model(torch.tensor([p + toks[:depth]]), output_hidden_states=True
                                      ).hidden_states[-1][0, -1]
            total += float(torch.log_softmax(runner.logits(hidden, rows), -1)[tok - rows.start])
        assert constraint.trie.lookup(np.array([toks]))[0] == item
        assert float(res.scores[b, 0]) == pytest.approx(total / len(toks), abs=1e-4)


def test_recommend_api_and_bad_input():
    model = tiny("qwen3", seed=9)
    constraint = make_constraint(seed=3)
    items, scores = recommend(model, None, constraint, random_prompts(2, seed=10), num_beams=4,
                              top_k=3)
    assert items.shape == scores.shape == (2, 3)
    with pytest.raises(GreamError, match="top_k"):
        recommend(model, None, constraint, [[5, 6]], num_beams=4, top_k=5)
    with pytest.raises(GreamError, match="empty"):
        recommend(model, None, constraint, [[5, 6], []], num_beams=4, top_k=3)
    with pytest.raises(GreamError, match="no tokenizer"):
        recommend(model, None, constraint, ["a prompt"], num_beams=4, top_k=3)
    with pytest.raises(GreamError, match="score"):
        recommend(model, None, constraint, [[5]], num_beams=4, top_k=3, score="bogus")


def test_sample_is_seeded_real_and_reports_the_policy_logprobs():
    model = tiny("qwen3", seed=11)
    constraint = make_constraint(seed=4)
    prompts = random_prompts(3, seed=12)
    a = sample(model, prompts, constraint, n=5, seed=1)
    b = sample(model, prompts, constraint, n=5, seed=1)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, sample(model, prompts, constraint, n=5, seed=2).tokens)
    assert torch.equal(a.prompt, torch.arange(3).repeat_interleave(5))
    assert (a.items >= 0).all()
    # the log-prob of each response token is the model's full-vocabulary log-softmax
    for r in range(a.tokens.shape[0]):
        toks = a.tokens[r][a.mask[r]].tolist()
        assert toks[-1] == EOS
        with torch.no_grad():
            logits = model(torch.tensor([prompts[r // 5] + toks])).logits[0]
        lp = torch.log_softmax(logits[len(prompts[r // 5]) - 1:-1], -1)
        want = lp[torch.arange(len(toks)), torch.tensor(toks)]
        torch.testing.assert_close(a.logprobs[r][a.mask[r]], want, atol=1e-5, rtol=0)


def test_sample_top_p_keeps_the_most_likely_child():
    """(The sampling distribution itself is tested on sample_children in test_trie_logits.)"""
    model = tiny("qwen2", seed=13)
    constraint = make_constraint(seed=5)
    prompt = random_prompts(1, seed=14)
    with torch.no_grad():
        logits = model(torch.tensor(prompt)).logits[0, -1]
    children = torch.as_tensor(constraint.trie.allowed([]))
    greedy = sample(model, prompt, constraint, n=4, seed=0, top_p=1e-6, temperature=0.7)
    assert (greedy.tokens[:, 0] == children[logits[children].argmax()]).all()


def test_batches_that_do_not_fit_are_split_not_dropped():
    from gream_fast.model.runner import bytes_per_prompt, plan_batches

    model = tiny("qwen3", seed=17)
    constraint = make_constraint(seed=7)
    prompts = random_prompts(5, seed=18)
    runner = DecoderRunner(model)
    need = max(bytes_per_prompt(runner, len(p), 4, constraint.max_len) for p in prompts)
    chunks = plan_batches(runner, prompts, 4, constraint.max_len, budget=2 * need)
    assert len(chunks) >= 3 and chunks[0].start == 0 and chunks[-1].stop == 5
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
    assert plan_batches(runner, prompts, 4, constraint.max_len, budget=1) == [
        slice(i, i + 1) for i in range(5)]  # too small for any: one prompt per batch
    whole = recommend(model, None, constraint, prompts, num_beams=4, top_k=3)
    split = recommend(model, None, constraint, prompts, num_beams=4, top_k=3, memory_budget=2 * need)
    assert torch.equal(whole[0], split[0])
    torch.testing.assert_close(whole[1], split[1], atol=1e-5, rtol=0)


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=PAD)
    return out[0, len(prompt):].tolist()


def test_reasoning_thinks_like_hf_greedy_and_answers_with_real_items():
    from gream_fast.generate.reasoning import reason_and_recommend, think

    model = tiny("qwen3", seed=19)
    prompts = random_prompts(4, seed=20)
    runner = DecoderRunner(model)
    free = [hf_greedy(model, p, 12) for p in prompts]
    # the answer marker: a token prompt 0's greedy text reaches at step 3; prompt 0 must stop
    # there while the others run on (and leave the batch at different times, or hit the budget)
    marker = [free[0][3]]
    reasoning, forced = think(runner, prompts, marker, budget=12, temperature=0)
    for p, (r, f) in enumerate(zip(reasoning, forced.tolist())):
        cut = free[p].index(marker[0]) + 1 if marker[0] in free[p] else None
        if cut is not None:
            assert r == free[p][:cut] and not f
        else:
            assert r == free[p] + marker and f
    assert reasoning[0] == free[0][:4]

    constraint = make_constraint(seed=8)
    res = reason_and_recommend(model, None, constraint, prompts, think_budget=6, temperature=0,
                               num_beams=5, top_k=5, answer_ids=[7, 8], end_token_id=EOS)
    assert all(r[-2:] == [7, 8] and len(r) <= 8 for r in res.reasoning)
    direct = beam_search(runner, [p + r for p, r in zip(prompts, res.reasoning)], constraint, 5, 5)
    assert torch.equal(res.items, direct.items) and (res.items >= 0).all()
    sampled = reason_and_recommend(model, None, constraint, prompts, think_budget=6, seed=1,
                                   num_beams=5, top_k=5, answer_ids=[7, 8], end_token_id=EOS)
    again = reason_and_recommend(model, None, constraint, prompts, think_budget=6, seed=1,
                                 num_beams=5, top_k=5, answer_ids=[7, 8], end_token_id=EOS)
    assert sampled.reasoning == again.reasoning and torch.equal(sampled.items, again.items)


@pytest.mark.gpu
def test_cuda_beam_search_matches_hf_generate():
    """On a GPU the runner's Triton kernels (decode attention, trie step) run for real."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny("qwen3", seed=3).cuda()
    constraint = make_constraint().to("cuda")
    prompts = random_prompts(6, seed=4)
    ours = beam_search(DecoderRunner(model), prompts, constraint, 10, 10)
    items, scores = hf_generate(model, prompts, constraint, 10, 10)
    assert torch.equal(ours.items.cpu(), items.cpu())
    torch.testing.assert_close(ours.scores.cpu(), scores.cpu(), atol=1e-3, rtol=0)
    rolls = sample(model, prompts, constraint, n=4, seed=0)
    assert (rolls.items >= 0).all()


@pytest.mark.gpu
def test_cuda_bf16_runner_tracks_hf():
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=128, max_position_embeddings=512, tie_word_embeddings=False,
                      eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16).eval()
    runner = DecoderRunner(model)
    prompts = random_prompts(8, seed=21, lo=40, hi=200)
    with torch.no_grad():
        hidden, state = runner.prefill(prompts, 3, 2)
        ref = torch.stack([model(torch.tensor([p], device="cuda")).logits[0, -1] for p in prompts])
        got = runner.logits(hidden)
        assert (got.float() - ref.float()).abs().max() < 0.05 * ref.float().abs().max()
        toks = torch.randint(3, VOCAB, (24,), device="cuda")
        out = runner.logits(runner.decode(toks, state))
        seqs = [prompts[r // 3] + [int(toks[r])] for r in range(24)]
        ref = torch.stack([model(torch.tensor([s], device="cuda")).logits[0, -1] for s in seqs])
        assert (out.float() - ref.float()).abs().max() < 0.05 * ref.float().abs().max()


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager():
    # The same steps (with a reorder and a select that changes the row count) on two runners,
    # eager and replaying CUDA graphs; then a whole beam search on each.
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny("qwen3", seed=7).cuda()
    eager, graphs = DecoderRunner(model), DecoderRunner(model, cuda_graphs=True)
    prompts = random_prompts(4, seed=8, lo=20, hi=60)
    g = torch.Generator(device="cuda").manual_seed(9)
    with torch.no_grad():
        (_, a), (_, b) = eager.prefill(prompts, 3, 6), graphs.prefill(prompts, 3, 6)
        for step in range(6):
            if step == 2:
                parents = torch.tensor([2, 0, 1, 3, 3, 4, 6, 7, 8, 11, 9, 10], device="cuda")
                a.reorder(parents)
                b.reorder(parents)
            if step == 3:
                keep = torch.tensor([0, 1, 4, 5, 9, 10, 11], device="cuda")
                a.select(keep)
                b.select(keep)
            tokens = torch.randint(3, VOCAB, (a.rows,), device="cuda", generator=g)
            torch.testing.assert_close(graphs.decode(tokens, b), eager.decode(tokens, a),
                                       atol=1e-5, rtol=1e-5)
        assert sorted(b.graphs) == [7, 12] and not a.graphs  # captured once per row count
    constraint = make_constraint().to("cuda")
    ours = beam_search(graphs, prompts, constraint, num_beams=5, top_k=5)
    ref = beam_search(eager, prompts, constraint, num_beams=5, top_k=5)
    assert torch.equal(ours.items, ref.items)
    torch.testing.assert_close(ours.scores, ref.scores, atol=1e-5, rtol=1e-5)
