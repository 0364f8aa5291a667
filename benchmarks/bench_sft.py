"""SFT step throughput: our loop (packed rows, block-causal attention, chunked cross-entropy) vs
the Hugging Face Trainer on the same model, examples and examples per step.

    python benchmarks/bench_sft.py [--quick] [--device cpu|cuda] [--repeat N] [--out DIR]

Examples are random prompt + response token sequences (loss on the response only) of mixed
lengths; the Trainer gets them padded per batch (its usual collator), ours packed in order into
rows as wide as the longest example (wider rows cost more attention under the block mask).
Tokens/s counts real (non-pad) tokens. Shapes: the tiny Qwen3 in fp32 on CPU; Qwen3-0.6B in
bf16 autocast on CUDA, where peak memory is reported too. What bounds it: the forward and
backward GEMMs (6 x params x tokens FLOPs) plus, for the Trainer, the padded tokens and the
full [tokens, vocab] float32 logits.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/bench_sft.py`

from benchmarks.bench_generate import SHAPES  # noqa: E402
from benchmarks.harness import Bench, common_args  # noqa: E402
from gream_fast.tasks.chat import IGNORE_INDEX, pack  # noqa: E402
from gream_fast.train.sft import add_shift_labels, packed_loss  # noqa: E402


def make_model(shape, device):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False,
                      pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device)


def make_examples(n, lo, hi, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = torch.randint(1, vocab, (length,), generator=g)
        labels = ids.clone()
        labels[: length * 3 // 4] = IGNORE_INDEX  # the prompt
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


def pack_rows(examples, seq_len):
    """In order into rows of seq_len tokens: the SFT loop's own packing."""
    return add_shift_labels(pack(examples, seq_len))


def collate(examples):
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def run_ours(model, batches, dev, warmup):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda" or None)
    times = []
    for i, batch in enumerate(batches):
        batch = {k: v.to(dev) for k, v in batch.items() if torch.is_tensor(v)}
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss, _ = packed_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def run_trainer(model, examples, per_step, steps, dev, warmup):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if state.global_step > warmup:
                times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=per_step, max_steps=steps,
            learning_rate=1e-4, max_grad_norm=1.0, logging_strategy="no", save_strategy="no",
            report_to=[], use_cpu=dev.type != "cuda", bf16=dev.type == "cuda",
            dataloader_num_workers=0, disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=examples, data_collator=collate,
                          callbacks=[Clock()])
        trainer.train()
    return sum(times) / len(times)


def main(argv=None):
    args = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv)
    bench = Bench("sft", args)
    dev = bench.device
    shape = "qwen3-0.6b" if dev.type == "cuda" else "tiny"
    per_step, warmup = (16, 2) if dev.type == "cuda" else (8, 1)
    steps = warmup + (2 if args.quick else 4)
    lo, hi = (128, 512) if dev.type == "cuda" else (64, 256)
    vocab = SHAPES[shape]["vocab_size"]
    examples = make_examples(per_step * steps, lo, hi, vocab)
    real = [sum(len(e["input_ids"]) for e in examples[i * per_step:(i + 1) * per_step])
            for i in range(steps)]
    tokens = sum(real[warmup:]) / (steps - warmup)
    case = f"{shape}, {per_step} examples of {lo}-{hi} tokens per step"
    with bench.profiling():
        results = {}
        for impl in ("HF Trainer (padded batches)", "ours (packed, chunked CE)"):
            model = make_model(shape, dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if impl.startswith("HF"):
                t = run_trainer(model, examples, per_step, steps, dev, warmup)
            else:
                batches = [pack_rows(examples[i * per_step:(i + 1) * per_step], hi)
                           for i in range(steps)]
                t = run_ours(model, batches, dev, warmup)
            mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
            results[impl] = t
            base = next(iter(results.values()))
            bench.add(case, impl, t, work=tokens, unit="tokens/s", baseline=base,
                      notes="" if mem is None else f"peak {mem:.2f} GiB")
            del model
    bench.note("target (issue 6): >= 1.5x the HF Trainer's tokens/s at no more memory on an "
               "H100/H200 (Qwen3-0.6B shape)")
    return bench.finish()


if __name__ == "__main__":
    main()
