"""One TRL GRPO step with three rollouts: gream_rollout_func (integrations/trl.py) against what a
TRL user would otherwise run, on the same trainer, model, prompts and group size.

    python benchmarks/bench_trl.py [--quick] [--device cpu|cuda] [--repeat N] [--out DIR]

The three rollouts, each inside SRPOGRPOTrainer (TRL 1.16's GRPOTrainer + SRPO's advantage;
loss "dapo", beta 0.001, AdamW lr 2e-6), sampling at temperature 1:
  TRL generate          TRL's own generation (HF generate over the repeated prompts, the full
                        vocabulary, max_completion_length = SID length + 1): unconstrained, so
                        most completions of an untrained model are not items (reward 0).
  HF generate + trie    a rollout_func running HF generate with SIDLogitsProcessor
                        (generate/hf.py), the constrained rollout a TRL user writes today:
                        every prompt copy prefilled and decoded on its own.
  gream_rollout_func    our engine: one prefill per group, the prompt KV shared by its n
                        samples, the trie mask in one kernel per step.
Measured per optimizer step (a generation batch = one step): wall time (median), the time in
GRPOTrainer._generate (tokenising, rollout, decoding: what the rollout changes), peak memory
(CUDA max allocated; CPU peak RSS above the worker's imports), and the fraction of completions
that spell a real item (SID tokens + EOS under the trie). Each rollout runs in a fresh process:
2 warm-up steps, then min(--repeat, 3) timed steps (quick: 2).

Shapes (bench_srpo's): CUDA = Qwen3-0.6B in bf16, 64 prompts x 10, 128-token prompts, 20k items
x 4 levels x 256 codes; CPU = the tiny Qwen3 (TINY_SIZES["base"]) in fp32, 16 prompts x 8,
32-token prompts, 2,000 items x 4 x 32 (quick: 4 x 4, 16-token prompts, 500 items). What
bounds a step: the rollout ((L+1) decode steps over P x n rows; HF re-runs every prompt copy's
prefill and one Python trie callback per step, ours one prefill per prompt), then TRL's
reference and policy passes over P x n padded rows, the same for all three.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/bench_trl.py`

from benchmarks.bench_generate import SHAPES  # noqa: E402
from benchmarks.bench_srpo import (BETA, CLIP, EOS, LR, PAD, WEIGHT_DECAY, Memory, cases,  # noqa: E402
                                   make_items, make_model, make_prompts, step_clock, sync,
                                   trl_available)
from benchmarks.harness import Bench, common_args, spawn_worker  # noqa: E402

ROLLOUTS = {"trl": "TRL generate (unconstrained)", "hf": "HF generate + SIDLogitsProcessor",
            "gream": "gream_rollout_func"}


def sid_tokenizer(vocab, index, table):
    """A word-level tokenizer: "<id>" <-> id for the text ids, each SID string <-> its id in
    `table`, so text prompts give exactly our token ids and the adapters' tokenizer checks
    pass."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"<{i}>": i for i in range(int(table.min()))}
    words.update(zip(index.token_strings(), table.ravel().tolist()))
    words.update({f"<{i}>": i for i in range(int(table.max()) + 1, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token=f"<{PAD}>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"<{EOS}>",
                                   pad_token=f"<{PAD}>", unk_token=f"<{PAD}>")


def hf_rollout_func(constraint):
    """The rollout a TRL user writes today: HF generate over the repeated prompts with the
    exact trie as a logits processor; log-probs at the trainer's temperature (what TRL
    recomputes)."""
    from transformers import LogitsProcessorList
    from trl.models import unwrap_model_for_generation

    from gream_fast.generate.hf import SIDLogitsProcessor

    def rollout(prompts, trainer):
        ids, _, _ = trainer._tokenize_prompts(prompts)
        width = max(map(len, ids))
        dev = trainer.accelerator.device
        input_ids = torch.tensor([[PAD] * (width - len(p)) + list(p) for p in ids], device=dev)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids], device=dev)
        temp = trainer.temperature
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model, \
                torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=temp, top_p=1.0, top_k=0,
                max_new_tokens=constraint.max_len, eos_token_id=EOS, pad_token_id=PAD,
                logits_processor=LogitsProcessorList([SIDLogitsProcessor(constraint, width)]),
                return_dict_in_generate=True, output_logits=True)
        gen = out.sequences[:, width:]
        lp = torch.log_softmax(torch.stack(out.logits, 1).float() / temp, -1)
        lp = lp.gather(2, gen[:, :, None]).squeeze(2)
        completions, logprobs = [], []
        for g, l in zip(gen.tolist(), lp.tolist()):
            end = g.index(EOS) + 1 if EOS in g else len(g)
            completions.append(g[:end])
            logprobs.append(l[:end])
        return {"prompt_ids": [list(p) for p in ids], "completion_ids": completions,
                "logprobs": logprobs}

    return rollout


def run(c, device, rollout, warmup, steps):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from gream_fast.generate import SIDConstraint
    from gream_fast.integrations import trl as gt

    mem = Memory(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = SHAPES[c["shape"]]["vocab_size"]
    index, table, base = make_items(c["items"], c["levels"], c["k"], vocab)
    tok = sid_tokenizer(vocab, index, table)
    constraint = SIDConstraint(index, tok, device=device)
    total = warmup + steps
    prompts = make_prompts(total * c["prompts"], c["prompt_len"], base)
    texts = [" ".join(f"<{t}>" for t in p) for p in prompts]
    if tok(texts[0])["input_ids"] != prompts[0]:
        raise RuntimeError("the word tokenizer does not give back the prompt's token ids")
    targets = np.random.default_rng(1).integers(0, c["items"], len(prompts)).tolist()
    gen_times, completions = [], []
    clock = step_clock(device, warmup, mem)

    class Timed(gt.SRPOGRPOTrainer):
        def _generate(self, prompts):
            sync(device)
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            sync(device)
            if self.state.global_step >= warmup:
                gen_times.append(time.perf_counter() - t0)
                completions.extend(out[1])  # completion_ids
            return out

    rollout_func = {"trl": None, "hf": hf_rollout_func(constraint),
                    "gream": gt.gream_rollout_func(constraint, tok)}[rollout]
    with tempfile.TemporaryDirectory() as tmp:
        make_model(c["shape"], "cpu", dtype).save_pretrained(tmp)  # the reference loads from it
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa")
        args = gt.srpo_grpo_config(
            output_dir=tmp, per_device_train_batch_size=c["prompts"] * c["n"],
            num_generations=c["n"], max_completion_length=constraint.max_len, beta=BETA,
            learning_rate=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP,
            lr_scheduler_type="constant", warmup_steps=0, max_steps=total,
            logging_strategy="no", save_strategy="no", dataloader_num_workers=0,
            disable_tqdm=True, seed=0, shuffle_dataset=False)
        trainer = Timed(model=model, args=args, processing_class=tok,
                        train_dataset=Dataset.from_dict({"prompt": texts, "target": targets}),
                        reward_funcs=gt.sid_reward_func(constraint, on_invalid="zero"),
                        rollout_func=rollout_func, callbacks=[clock])
        trainer.train()
        peak = mem.peak()
    eos_rows = [r[:r.index(EOS) + 1] if EOS in r else r for r in completions]
    width = max(map(len, eos_rows))
    padded = np.array([r + [-1] * (width - len(r)) for r in eos_rows])
    real = float((constraint.trie.lookup(padded) >= 0).mean())
    return {"times": clock.times, "generate": gen_times, "peak": peak, "real": real,
            "completions": len(completions)}


def worker(args):
    from benchmarks.bench_srpo import _cpu_kernels_are_torch, _preimport

    device = torch.device(args.device)
    if device.type == "cpu":
        _cpu_kernels_are_torch()
    _preimport("trl")
    c = cases(device.type, args.quick)
    steps = max(1, min(args.repeat, 2 if args.quick else 3))
    print("RESULT " + json.dumps(run(c, device, args.worker, 2, steps)), flush=True)


def main(argv=None):
    parser = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--worker", choices=tuple(ROLLOUTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    bench = Bench("trl", args)
    missing = trl_available()
    if missing:
        bench.note(missing.replace("baseline", "benchmark"))
        return bench.finish()
    dev = bench.device
    c = cases(dev.type, args.quick)
    rows = c["prompts"] * c["n"]
    case = (f"{c['shape']} {c['prompts']} prompts x {c['n']}, P={c['prompt_len']}, "
            f"{c['items']} items x {c['levels']}x{c['k']}")
    scale, unit_mem = (2 ** 30, "GiB") if dev.type == "cuda" else (2 ** 20, "MiB")
    results = {name: spawn_worker(__file__, name, args) for name in ROLLOUTS}
    base = statistics.median(results["trl"]["times"])
    for name, r in results.items():
        t, g = statistics.median(r["times"]), statistics.median(r["generate"])
        bench.add(case, ROLLOUTS[name], t, work=rows, unit="completions/s", baseline=base,
                  notes=f"rollout (_generate) {g * 1e3:.0f} ms; real items {r['real']:.1%} of "
                        f"{r['completions']}; peak {r['peak'] / scale:.2f} {unit_mem}; steps "
                        + " ".join(f"{x:.3g}" for x in r["times"]) + " s")
    hf, ours = results["hf"], results["gream"]
    bench.note(f"rollout time HF + trie / gream: "
               f"{statistics.median(hf['generate']) / statistics.median(ours['generate']):.1f}x; "
               f"step time {statistics.median(hf['times']) / statistics.median(ours['times']):.1f}x")
    bench.note("ratio = TRL-generate step time / this row's; the same trainer, loss and "
               "optimizer in all three rows: only the rollout differs")
    if ours["real"] < 1 or hf["real"] < 1:
        bench.note("ERROR: a constrained rollout returned a completion that is not an item")
    bench.finish()
    return 0 if ours["real"] == 1 and hf["real"] == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
