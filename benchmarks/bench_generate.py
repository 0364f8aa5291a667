"""Direct recommendation: trie-constrained beam search, ours vs Hugging Face `generate`.

    python benchmarks/bench_generate.py [--quick] [--device cpu|cuda] [--repeat N] [--out DIR]

Same random-weight model, prompts and items for every implementation:
  HF + callback   model.generate(num_beams, prefix_allowed_tokens_fn = the exact trie), the way
                  users constrain generation today (the baseline)
  HF + processor  model.generate with our SIDLogitsProcessor (batched trie walk + one scatter)
  ours full       gream_fast beam_search, score="full" (same ranking as HF), our runner
  ours sid        score="sid": only the level's SID rows of the LM head
Shapes: on CUDA, Qwen3-0.6B (B 16 and 64) and Qwen3-4B (B 16) in bf16, 128-token prompts,
10 beams, 20k items x 4 levels x 256 codes (quick: 0.6B, B 16); on CPU a tiny Qwen3 in fp32.
Also on CUDA: the shared-prefix decode attention kernel alone (GB/s of KV read) and the
trie_topk step alone (1024 rows).

Reasoning rollouts (the SRPO rollout of reasoning mode): n samples per prompt at temperature 1,
free text for up to the think budget, then the answer marker and a SID under the trie:
  HF generate     model.generate(do_sample=True, num_return_sequences=n, max_new_tokens = budget
                  + marker + SID), unconstrained (the baseline: what TRL's rollouts run)
  ours            generate.sample(mode="reasoning"): the device-side think loop, the prompt's KV
                  once per group
Throughput = generated tokens (each row up to and including its last token) per second. Shapes:
CPU "tiny-small" (hidden 128, 2 layers) in fp32, 16 prompts x 8, 32-token prompts, budget 256
(quick: 4 x 4, budget 32); CUDA Qwen3-0.6B in bf16, 16 prompts x 10, 128-token prompts, budget
512. A tiny model's step is op-overhead bound (a few hundred small ops per token), 0.6B's by its
weight and KV reads.

What bounds it: one prefill (FLOPs at the matrix rate) + one decode step per SID token
(weights read once per step at the memory bandwidth); the floor printed is their sum.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/bench_generate.py`

from benchmarks.harness import Bench, common_args, device_name, nvtx, time_fn  # noqa: E402
from gream_fast.generate import SIDConstraint, beam_search  # noqa: E402
from gream_fast.generate.hf import SIDLogitsProcessor  # noqa: E402
from gream_fast.index.semantic_index import SemanticIndex  # noqa: E402
from gream_fast.model import DecoderRunner  # noqa: E402

SHAPES = {  # name: Qwen3 config fields
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=4096),
    "tiny-small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       vocab_size=4096),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936),
}
PEAK_BF16 = [("H200", 989e12), ("H100", 989e12), ("A100", 312e12)]
PEAK_BW = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12)]
EOS, PAD, BEAMS = 2, 0, 10


def _lookup(table, name):
    return next((v for key, v in table if key in name), None)


def make_model(shape, device, dtype):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False,
                      eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.1)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def make_items(n, levels, k, vocab, seed=0):
    """n items of `levels` codes (balanced-ish, with collisions), SID tokens at the top of the
    vocabulary."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, k, size=(n, levels))
    index = SemanticIndex.from_codes(codes, k)
    base = vocab - (levels + 1) * k
    table = base + np.arange((levels + 1) * k).reshape(levels + 1, k)
    return index, table


def make_prompts(b, p, vocab_text, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_text, (b, p), generator=g).tolist()


def hf_generate(model, prompts, constraint, processor: bool):
    ids = torch.tensor(prompts, device=model.device)
    width = ids.shape[1]
    trie = constraint.trie
    if processor:
        from transformers import LogitsProcessorList

        how = {"logits_processor": LogitsProcessorList([SIDLogitsProcessor(constraint, width)])}
    else:
        def allowed(_, seq):
            return trie.allowed(seq[width:].tolist()).tolist() or [EOS]
        how = {"prefix_allowed_tokens_fn": allowed}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=BEAMS,
                         num_return_sequences=BEAMS, max_new_tokens=constraint.max_len,
                         do_sample=False, return_dict_in_generate=True, eos_token_id=EOS,
                         pad_token_id=PAD, **how)
    gen = out.sequences[:, width:].cpu()
    after = (gen == EOS).cumsum(1) - (gen == EOS).int() > 0
    gen[after] = -1
    return torch.as_tensor(trie.lookup(gen.numpy())).view(len(prompts), BEAMS)


def setup(dev, shape, b, p, n_items, levels, k, end_token):
    """(model, runner, constraint, token table, prompts) of a case: the shape's random model
    (bf16 on CUDA, fp32 on CPU), n_items SIDs at the top of its vocabulary, b prompts of p
    tokens below them."""
    model = make_model(shape, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    vocab = SHAPES[shape]["vocab_size"]
    index, table = make_items(n_items, levels, k, vocab)
    constraint = SIDConstraint(index, token_table=table, eos_token_id=end_token, device=dev)
    prompts = make_prompts(b, p, vocab - (levels + 1) * k)
    return model, DecoderRunner(model), constraint, table, prompts


def bench_case(bench, args, shape, b, p, n_items, levels, k):
    dev = bench.device
    model, runner, constraint, table, prompts = setup(dev, shape, b, p, n_items, levels, k, EOS)
    case = f"{shape} B={b} P={p} {BEAMS} beams, {n_items // 1000}k items x {levels}x{k}"
    repeat = args.repeat

    def run_hf(processor):
        with torch.no_grad():
            return hf_generate(model, prompts, constraint, processor)

    with nvtx("generate/hf-callback"):
        t_hf = time_fn(lambda: run_hf(False), warmup=1, repeat=repeat, device=dev)["median"]
    hf_items = run_hf(False)
    bench.add(case, "HF generate + trie callback", t_hf, work=b, unit="users/s", baseline=t_hf)
    with nvtx("generate/hf-processor"):
        t_proc = time_fn(lambda: run_hf(True), warmup=1, repeat=repeat, device=dev)["median"]
    bench.add(case, "HF generate + SIDLogitsProcessor", t_proc, work=b, unit="users/s",
              baseline=t_hf)

    # the floor: prefill FLOPs at the matrix rate + one weight read per decode step
    name = device_name(dev)
    params = sum(x.numel() for x in model.parameters())
    steps = constraint.max_len
    floor = None
    if dev.type == "cuda" and _lookup(PEAK_BF16, name) and _lookup(PEAK_BW, name):
        floor = (2 * params * b * p / _lookup(PEAK_BF16, name)
                 + steps * params * 2 / _lookup(PEAK_BW, name))

    for score in ("full", "sid"):
        def ours():
            return beam_search(runner, prompts, constraint, BEAMS, BEAMS, score=score)
        with nvtx(f"generate/ours-{score}"):
            t = time_fn(ours, warmup=1, repeat=repeat, device=dev)["median"]
        items = ours().items.cpu()
        agree = float((items == hf_items).all(1).float().mean())
        top1 = float((items[:, 0] == hf_items[:, 0]).float().mean())
        bench.add(case, f"ours score={score}", t, work=b, unit="users/s", baseline=t_hf,
                  roofline=None if floor is None else floor / t,
                  notes=f"rows with HF's exact top-{BEAMS}: {agree:.0%}, same top-1: {top1:.0%}"
                  + ("" if score == "full" else " (sid ranks differently by design)"))

    # where our time goes: prefill alone, and one decode step over all B x beams rows
    t_pre = time_fn(lambda: runner.prefill(prompts, BEAMS, steps), warmup=1, repeat=repeat,
                    device=dev)["median"]
    _, state = runner.prefill(prompts, BEAMS, steps)
    toks = torch.full((b * BEAMS,), int(table[0, 0]), device=dev)

    def one_step():
        state.rewind(0)
        return runner.decode(toks, state)
    t_step = time_fn(one_step, warmup=2, repeat=repeat, device=dev)["median"]
    bench.note(f"{case}: prefill {t_pre * 1e3:.2f} ms, one decode step over {b * BEAMS} rows "
               f"{t_step * 1e3:.2f} ms (trunk only, no head); {steps} steps per search"
               + ("" if floor is None else f"; floor {floor * 1e3:.2f} ms per batch"))


MARKER, END = [7, 8, 9], 5  # reasoning: the answer marker's ids, the SID's end token


def reasoning_case(bench, args, shape, b, n, p, budget, n_items=2000, levels=4, k=32):
    from gream_fast.generate import sample

    dev = bench.device
    model, runner, constraint, _, prompts = setup(dev, shape, b, p, n_items, levels, k, END)
    case = f"reasoning {shape} {b} prompts x {n}, P={p}, think budget {budget}"
    longest = budget + len(MARKER) + constraint.max_len
    ids = torch.tensor(prompts, device=dev)
    seed = iter(range(1 << 30))
    counts = {"hf": [], "ours": [], "real": []}  # generated tokens of each timed call

    def hf():
        torch.manual_seed(next(seed))
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 num_return_sequences=n, max_new_tokens=longest,
                                 eos_token_id=EOS, pad_token_id=PAD)
        gen = out[:, p:]
        ended = (gen == EOS).cumsum(1) - (gen == EOS).int() > 0  # after the first EOS
        counts["hf"].append(int((~ended).sum()))

    def ours():
        r = sample(model, prompts, constraint, n=n, temperature=1.0, seed=next(seed),
                   mode="reasoning", think_budget=budget, answer_ids=MARKER, stop_ids=[EOS],
                   runner=runner)
        counts["ours"].append(int(r.mask.sum()))
        counts["real"].append(float((r.items >= 0).float().mean()))  # rows that name an item

    repeat = min(args.repeat, 3)  # a CPU run of HF's is many seconds
    with nvtx("generate/reasoning-hf"):
        t_hf = time_fn(hf, warmup=1, repeat=repeat, device=dev)["median"]
    with nvtx("generate/reasoning-ours"):
        t = time_fn(ours, warmup=1, repeat=repeat, device=dev)["median"]
    (hf_tok, our_tok) = (sum(c[1:]) / len(c[1:]) for c in (counts["hf"], counts["ours"]))
    bench.add(case, "HF generate (sampling, unconstrained)", t_hf, work=hf_tok,
              unit="tokens/s", baseline=t_hf, notes=f"{hf_tok / (b * n):.1f} tokens per row")
    # the two draw different samples, of a little different lengths: the ratio is tokens/s
    bench.add(case, "ours sample(mode=reasoning) (trie-constrained)", t, work=our_tok,
              unit="tokens/s", baseline=t_hf * our_tok / hf_tok,
              notes=f"{our_tok / (b * n):.1f} tokens per row, {min(counts['real']):.0%} of rows "
                    "a real item; ratio = tokens/s over HF's")


def bench_kernels(bench, args):
    """CUDA only: the decode attention and the trie step alone."""
    from gream_fast.kernels.prefix_attention import shared_prefix_attention
    from gream_fast.kernels.trie_logits import trie_topk

    dev = bench.device
    b, p, beams, hq, hkv, d, s = 64, 128, BEAMS, 16, 8, 128, 5
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(b * beams, hq, d, device=dev, dtype=torch.bfloat16, generator=g)
    pk = torch.randn(b * p, hkv, d, device=dev, dtype=torch.bfloat16, generator=g)
    pv = torch.randn_like(pk)
    cu = torch.arange(0, b * p + 1, p, device=dev, dtype=torch.int32)
    row_cu = torch.arange(0, b * beams + 1, beams, device=dev, dtype=torch.int32)
    sk = torch.randn(b * beams, s, hkv, d, device=dev, dtype=torch.bfloat16, generator=g)
    sv = torch.randn_like(sk)
    lens = torch.full((b * beams,), s, device=dev, dtype=torch.int32)
    t = time_fn(lambda: shared_prefix_attention(q, pk, pv, cu, row_cu, sk, sv, lens, check=False),
                repeat=args.repeat, device=dev, flush_l2=True)["median"]
    moved = (pk.numel() + pv.numel() + sk.numel() + sv.numel() + 2 * q.numel()) * 2
    bw = _lookup(PEAK_BW, device_name(dev))
    bench.add(f"decode attention B={b} P={p} x{beams} rows, suffix {s}", "shared_prefix_attention",
              t, work=moved / 1e9, unit="GB/s", roofline=None if bw is None else moved / t / bw,
              notes="bytes = prompt KV once + suffix KV + q/o")
    # the baseline the kernel replaces: prompt KV copied per row, then SDPA over each row
    kk = pk.view(b, p, hkv, d).repeat_interleave(beams, 0)
    t_copy = time_fn(lambda: torch.cat([kk, sk], 1), repeat=args.repeat, device=dev,
                     flush_l2=True)["median"]
    bench.add(f"decode attention B={b} P={p} x{beams} rows, suffix {s}",
              "copy prompt K per row (what a per-row cache moves)", t_copy)

    rows, k = 1024, 2 * BEAMS
    index, table = make_items(20_000, 4, 256, 151936)
    con = SIDConstraint(index, token_table=table, eos_token_id=EOS, device=dev)
    logits = torch.randn(rows, 256, device=dev, generator=g)
    nodes = torch.randint(0, 257, (rows,), device=dev, generator=g).int()  # root + level-1 nodes
    t = time_fn(lambda: trie_topk(logits, nodes, con.indptr, con.tokens, k,
                                  token_offset=int(table[1, 0]), max_children=con.max_children),
                repeat=args.repeat, device=dev)["median"]
    bench.add(f"trie step {rows} rows, SID slice 256", "trie_topk (mask + log-softmax + top-20)",
              t, work=rows, unit="rows/s", notes="target < 20 us")


def main(argv=None):
    parser = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    bench = Bench("generate", args)
    with bench.profiling():
        if bench.device.type == "cuda":
            cases = [("qwen3-0.6b", 16)] if args.quick else [
                ("qwen3-0.6b", 16), ("qwen3-0.6b", 64), ("qwen3-4b", 16)]
            for shape, b in cases:
                bench_case(bench, args, shape, b, 128, 20_000, 4, 256)
                torch.cuda.empty_cache()  # the case's model is gone: free its memory
            bench_kernels(bench, args)
            reasoning_case(bench, args, "qwen3-0.6b", 16, 10, 128, 512)
        elif args.quick:
            bench_case(bench, args, "tiny", 4, 32, 1000, 3, 32)
            reasoning_case(bench, args, "tiny-small", 4, 4, 16, 32)
        else:
            bench_case(bench, args, "tiny", 16, 128, 5000, 3, 64)
            reasoning_case(bench, args, "tiny-small", 16, 8, 32, 256)
    bench.note("targets (issue 5): GPU 0.6B B=64 >= 20x HF + callback, a decode step of 640 rows "
               "< 2 ms, trie step < 20 us; CPU tiny >= 3x HF + callback")
    bench.note("target (issue 16): reasoning rollouts >= 3x HF generate sampling's tokens/s on "
               "the same rows, every row a real item (0.3x before the device-side think loop)")
    return bench.finish()


if __name__ == "__main__":
    main()
