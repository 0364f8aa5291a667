"""KVPool: decode buffers sized once and reused by every batch that fits (what lets a server's
CUDA graphs, captured per batch shape at warm-up, replay for every later batch of that shape).
On CPU: pooled batches give the runner's unpooled results, keep their buffers' addresses, and a
batch that does not fit runs on its own buffers; on CUDA (skipped here): graphs captured at
warm-up are replayed by later batches of other prompts, the capture count stays flat."""
import pytest
import torch

from gream_fast import InvalidInputError
from gream_fast.generate import beam_search, sample
from gream_fast.model import DecoderRunner

from test_generate import VOCAB, make_constraint, random_prompts, tiny


def _addresses(state):
    return [t.data_ptr() for t in (*state.prefix_k, *state.prefix_v, state.suffix_k,
                                   state.suffix_v, state.prefix_cu, state.row_cu, state.tokens,
                                   state.lens, state.start_pos, state.rope_cos)]


def test_pooled_decode_equals_unpooled_through_reorder_and_select():
    # Two batches of 3 prompts (other lengths, other tokens) through one pooled state: each
    # step's hidden states equal a fresh runner's, and the state and its buffers are the same
    # objects at the same addresses for both batches.
    model = tiny("qwen3", seed=11)
    plain, pooled = DecoderRunner(model), DecoderRunner(model)
    pool = pooled.reserve(prompts=4, prompt_len=20, rows=12, suffix_capacity=6)
    seen = []
    for seed in (1, 2):
        prompts = random_prompts(3, seed=seed, lo=3, hi=20)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            (ha, a), (hb, b) = plain.prefill(prompts, 3, 4), pooled.prefill(prompts, 3, 4)
            torch.testing.assert_close(hb, ha, atol=1e-6, rtol=1e-6)
            for step in range(4):
                if step == 1:
                    parents = torch.tensor([2, 0, 1, 3, 3, 4, 6, 7, 8])
                    a.reorder(parents)
                    b.reorder(parents)
                if step == 2:  # prompt 1's rows all leave
                    keep = torch.tensor([0, 2, 6, 7, 8])
                    a.select(keep)
                    b.select(keep)
                tokens = torch.randint(3, VOCAB, (a.rows,), generator=g)
                torch.testing.assert_close(pooled.decode(tokens, b), plain.decode(tokens, a),
                                           atol=1e-6, rtol=1e-6)
        seen.append((b, _addresses(b)))
    assert seen[0][0] is seen[1][0] and seen[0][1] == seen[1][1]
    assert list(pool.states) == [3] and pool.misses == 0


def test_pool_serves_beam_search_and_sampling_of_any_batch_that_fits(torch_kernels):
    model = tiny("qwen2", seed=12)
    constraint = make_constraint(seed=3)
    plain, pooled = DecoderRunner(model), DecoderRunner(model)
    pool = pooled.reserve(prompts=4, prompt_len=12, rows=20, suffix_capacity=constraint.max_len)
    for b, seed in ((4, 5), (1, 6), (4, 7), (2, 8)):
        prompts = random_prompts(b, seed=seed)
        ours = beam_search(pooled, prompts, constraint, num_beams=5, top_k=5)
        ref = beam_search(plain, prompts, constraint, num_beams=5, top_k=5)
        assert torch.equal(ours.items, ref.items)
        torch.testing.assert_close(ours.scores, ref.scores, atol=1e-5, rtol=1e-5)
    assert sorted(pool.states) == [1, 2, 4] and pool.misses == 0
    # sampling (rows leave as they finish) in the same pool
    prompts = random_prompts(3, seed=9)
    ours = sample(model, prompts, constraint, n=4, temperature=1.0, seed=3, runner=pooled)
    ref = sample(model, prompts, constraint, n=4, temperature=1.0, seed=3, runner=plain)
    assert torch.equal(ours.tokens, ref.tokens)
    assert pool.misses == 0


def test_batch_that_does_not_fit_runs_on_its_own_buffers(torch_kernels):
    model = tiny("llama", seed=13)
    constraint = make_constraint(seed=4)
    plain, pooled = DecoderRunner(model), DecoderRunner(model)
    pool = pooled.reserve(prompts=2, prompt_len=12, rows=10, suffix_capacity=constraint.max_len)
    too_many = random_prompts(3, seed=10)  # 3 prompts > 2
    too_long = [list(range(3, 16))]  # 13 tokens > 12
    for prompts, beams in ((too_many, 3), (too_long, 5), (random_prompts(1, seed=11), 12)):
        ours = beam_search(pooled, prompts, constraint, num_beams=beams, top_k=3)
        ref = beam_search(plain, prompts, constraint, num_beams=beams, top_k=3)
        assert torch.equal(ours.items, ref.items)
    assert pool.misses == 3 and not pool.states
    _, state = pooled.prefill(random_prompts(2, seed=12), 5, constraint.max_len)
    assert state is pool.states[2] and pool.misses == 3
    with pytest.raises(InvalidInputError, match="prompt_len=0"):
        pooled.reserve(prompts=2, prompt_len=0, rows=10, suffix_capacity=4)


@pytest.mark.gpu
def test_cuda_graphs_captured_at_warm_up_replay_for_later_batches():
    # A server's warm-up: one beam search per batch bucket captures one graph each; after
    # freeze(), batches of those sizes with other prompts replay them (results equal eager,
    # captures flat); a size with no graph runs eagerly and is counted.
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny("qwen3", seed=14).cuda()
    constraint = make_constraint(seed=5).to("cuda")
    eager, graphs = DecoderRunner(model), DecoderRunner(model, cuda_graphs=True)
    graphs.reserve(prompts=4, prompt_len=60, rows=4 * 5, suffix_capacity=constraint.max_len)
    for b in (1, 2, 4):
        beam_search(graphs, random_prompts(b, seed=b, lo=5, hi=60), constraint, 5, 5)
    captured = graphs.graph_captures
    assert captured == 3
    graphs.freeze()
    for b, seed in ((4, 20), (2, 21), (1, 22), (4, 23)):
        prompts = random_prompts(b, seed=seed, lo=5, hi=60)
        ours = beam_search(graphs, prompts, constraint, 5, 5)
        ref = beam_search(eager, prompts, constraint, 5, 5)
        assert torch.equal(ours.items, ref.items)
        torch.testing.assert_close(ours.scores, ref.scores, atol=1e-5, rtol=1e-5)
    assert graphs.graph_captures == captured and graphs.eager_steps == 0
    beam_search(graphs, random_prompts(3, seed=24), constraint, 5, 5)
    assert graphs.graph_captures == captured and graphs.eager_steps == constraint.max_len - 1
