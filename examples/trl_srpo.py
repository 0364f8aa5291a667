"""SRPO in TRL: a GRPOTrainer run with gream-fast's constrained rollouts, reward and advantage.

    python examples/trl_srpo.py                  # the demo's SFT model (make demo writes runs/demo)
    python examples/trl_srpo.py --run RUN_DIR    # another demo-layout run
    python examples/trl_srpo.py --tiny           # no run: a random tiny Qwen3 on synthetic data

Each prompt is a user's training history in the seqrec chat format the model was trained on;
its target is the next training item. CPU is fine (a few seconds per step at the defaults).
"""
import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from datasets import Dataset as HFDataset

from gream_fast.data import Dataset
from gream_fast.eval.evaluate import SeqRecPrompts, build_constraint
from gream_fast.integrations.trl import (SRPOGRPOTrainer, gream_rollout_func, sid_reward_func,
                                         srpo_grpo_config)
from gream_fast.tasks.context import load_index


def tiny_run(root: Path) -> tuple:
    """(model dir, data dir, index dir) of a random tiny Qwen3 on a synthetic dataset."""
    from gream_fast.data.prepare import prepare, write
    from gream_fast.data.synth import SynthConfig, synthesize
    from gream_fast.index import SemanticIndex
    from gream_fast.model.tiny import build_tiny

    write(prepare(synthesize(SynthConfig(users=200, items=100, seed=0))), root / "data")
    codes = np.random.default_rng(0).integers(0, 8, (Dataset.load(root / "data").num_items, 3))
    (root / "index").mkdir()
    SemanticIndex.from_codes(codes, 8).save(root / "index" / "index.safetensors")
    build_tiny(root / "data", root / "index", root / "model", vocab_size=1024, size="small")
    return root / "model", root / "data", root / "index"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo", help="a `gream-fast demo` run folder")
    p.add_argument("--tiny", action="store_true", help="a random tiny model instead of --run")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--n", type=int, default=8, help="completions per prompt")
    p.add_argument("--out", default=None, help="TRL's output_dir (default: a temp folder)")
    args = p.parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is "experimental"
    with tempfile.TemporaryDirectory(prefix="trl-srpo-") as tmp:
        train(args, Path(tmp))


def train(args, tmp: Path):
    run = Path(args.run)
    if args.tiny:
        model, data_dir, index_dir = tiny_run(tmp)
    elif (run / "sft_curriculum" / "final").is_dir():
        model, data_dir, index_dir = run / "sft_curriculum" / "final", run / "ml-100k", run / "index"
    else:
        raise SystemExit(f"{run}: no demo run here (make demo writes runs/demo); or pass --tiny")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    data, index = Dataset.load(data_dir), load_index(index_dir)
    chat = SeqRecPrompts(tokenizer, index)
    constraint = build_constraint(tokenizer, index, chat, "cpu")  # SIDs end with <|im_end|>
    rows = [data.train_sequence(u) for u in range(data.num_users)]
    rows = [r for r in rows if len(r) >= 2][:args.steps * args.prompts]
    train = HFDataset.from_dict({"prompt": [chat.messages(r[:-1][-20:]) for r in rows],
                                 "target": [int(r[-1]) for r in rows]})

    config = srpo_grpo_config(output_dir=args.out or str(tmp / "out"), num_generations=args.n,
                              per_device_train_batch_size=args.prompts * args.n,
                              max_steps=args.steps, logging_steps=1, learning_rate=2e-5,
                              warmup_steps=0, shuffle_dataset=False, save_strategy="no")
    trainer = SRPOGRPOTrainer(model=str(model), args=config, processing_class=tokenizer,
                              train_dataset=train, reward_funcs=sid_reward_func(constraint),
                              rollout_func=gream_rollout_func(constraint, tokenizer))
    trainer.train()


if __name__ == "__main__":
    main()
