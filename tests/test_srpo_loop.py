"""The SRPO loop (`gream-fast train srpo`): a tiny run end to end through the CLI (metrics,
checkpoints, final/, validation Recall), exact resume, and the errors of bad inputs. Data: a
small synthetic dataset and an index with a collision; the policy: a very small random Qwen3 with
the SID tokens, saved as an SFT run's final/ (SRPO only needs the SID vocabulary to run)."""
import json

import numpy as np
import pytest
import torch

from gream_fast.cli import main
from gream_fast.files import read_jsonl
from gream_fast.train.srpo_loop import Instances, SRPOConfig, model_dir, train

from tiny_data import LEVELS, make_data_and_index

pytestmark = pytest.mark.usefixtures("torch_kernels")  # whole runs: the kernels' torch paths
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16, intermediate_size=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from gream_fast.model.tiny import build_tiny

    root = tmp_path_factory.mktemp("srpo")
    data, index = make_data_and_index(root, users=30)
    # an "SFT run": the model in final/ (train srpo --model takes the run folder)
    build_tiny(root / "data", index, out_dir=root / "sft" / "final", seed=0, vocab_size=300,
               shape=SHAPE)
    return root, data


def args(root, out, *extra):
    return ["train", "srpo", "--model", str(root / "sft"), "--data", str(root / "data"),
            "--index", str(root / "index"), "--out", str(out), "--n", "4",
            "--prompts-per-step", "3", "--max-draws", "2", "--lr", "1e-3", "--warmup-steps", "1",
            "--device", "cpu", *extra]


def test_srpo_cli_end_to_end(setup, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, data = setup
    run = tmp_path / "run"
    assert main(args(root, run, "--steps", "2", "--save-every", "1", "--eval-every", "2",
                     "--eval-users", "3")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["final"] == str(run / "final")
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert "valid_recall@10" in metrics[0] and "valid_recall@10" in metrics[2]
    assert "valid_recall@10" not in metrics[1]
    for m in metrics[0], metrics[2]:  # Recall@K grows with K (@20 needs 20 items); top-1 items
        recall = [m[f"valid_recall@{k}"] for k in (1, 5, 10, 20) if f"valid_recall@{k}" in m]
        assert len(recall) >= 3 and recall == sorted(recall)
        assert 1 <= m["valid_distinct_top1"] <= 3  # (3 validation users)
    for m in metrics[1:]:
        assert 1 <= m["draws"] <= 2 and 0 <= m["kept_groups"] <= 3
        assert {"rollout_s", "step_time_s", "tokens_per_s", "lr", "elapsed_s"} <= set(m)
        assert 0 <= m["rollout_reward_mean"] <= 1 and 0 <= m["rollout_exact_rate"] <= 1
        # kept over drawn: at least the groups kept of the first draw's 3 prompts
        assert m["kept_fraction"] == m["kept_groups"] / (3 * m["draws"])
        assert (m["kept_groups"] == 0) or 1 <= m["distinct_items"] <= 4
        if m["updated"]:
            assert 0 <= m["reward_mean"] <= 1 and 0 <= m["exact_rate"] <= 1
            assert np.isfinite(m["loss"]) and LEVELS + 1 <= m["response_len"] <= LEVELS + 2
            assert {"scoring_s", "update_s", "kl", "grad_norm"} <= set(m)
    assert metrics[1]["lr"] == 1e-3 and metrics[2]["lr"] == 1e-3  # constant after warm-up
    assert 0 <= metrics[2]["valid_recall@10"] <= 1
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["format"] == "gream-fast-srpo" and state["prompts_seen"] == 6
    config = json.loads((run / "srpo_config.json").read_text())
    assert config["start_model"] == str(root / "sft" / "final") and config["beta"] == 0.001
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert AutoTokenizer.from_pretrained(run / "final").get_vocab() == \
        AutoTokenizer.from_pretrained(root / "sft" / "final").get_vocab()
    start = load_file(root / "sft" / "final" / "model.safetensors")
    end = model.state_dict()
    if any(m["updated"] for m in metrics[1:]):
        assert any(not torch.equal(start[k], end[k]) for k in start)
    # best/: the better of the two evaluated policies (step 0 = the start, step 2), ties -> step 0
    record = json.loads((run / "best" / "best.json").read_text())
    key = [(m["valid_recall@10"], m["valid_ndcg@10"]) for m in (metrics[0], metrics[2])]
    assert record["step"] == (2 if key[1] > key[0] else 0) == metrics[2]["best_step"]
    assert summary["best"]["step"] == record["step"]
    best = load_file(run / "best" / "model.safetensors")
    source = start if record["step"] == 0 else end
    assert all(torch.equal(best[k], source[k]) for k in best)


def test_best_policy_keeps_the_strictly_better(tmp_path):
    from gream_fast.train.srpo_loop import BestPolicy

    class Saved:  # stands in for a model / tokenizer: save_pretrained writes its tag
        def __init__(self, tag):
            self.tag = tag

        def save_pretrained(self, path, **_):
            (path / f"{type(self).__name__}-{self.tag}").touch()

    def m(recall, ndcg):
        return {"valid_recall@10": recall, "valid_ndcg@10": ndcg}

    best = BestPolicy(tmp_path, "recall@10")
    assert best.offer(0, m(0.2, 0.1), Saved(0), Saved(0))
    assert not best.offer(1, m(0.2, 0.1), Saved(1), Saved(1))  # a tie keeps the earlier
    assert not best.offer(2, m(0.1, 0.9), Saved(2), Saved(2))  # the metric comes first
    assert best.offer(3, m(0.2, 0.15), Saved(3), Saved(3))  # then NDCG@10
    assert sorted(q.name for q in (tmp_path / "best").iterdir()) == ["Saved-3", "best.json"]
    again = BestPolicy(tmp_path, "recall@10")  # --resume reads the record back
    assert again.record["step"] == 3 and not again.offer(4, m(0.2, 0.15), Saved(4), Saved(4))


def test_defaults_are_the_reference():
    cfg = SRPOConfig()
    assert (cfg.steps, cfg.prompts_per_step, cfg.n, cfg.lr, cfg.warmup_steps, cfg.weight_decay,
            cfg.beta, cfg.clip_grad, cfg.temperature, cfg.max_draws, cfg.mode) == \
        (150, 256, 10, 2e-6, 10, 0.1, 0.001, 1.0, 1.0, 10, "direct")


def test_instances_and_order(setup):
    from gream_fast.tasks.reason import FIRST_TARGET

    _, data = setup
    inst = Instances(data, 20, seed=5)
    lens = np.diff(data.offsets)
    assert len(inst) == int(np.maximum(lens - 2 - FIRST_TARGET, 0).sum())
    first = inst.batch(0, len(inst))
    assert sorted(first) == list(range(len(inst)))  # a permutation per pass
    assert inst.batch(1, 3) == first[1:4]
    again = Instances(data, 20, seed=5).batch(len(inst) - 2, 5)
    assert again[:2] == first[-2:]  # a step may span two passes
    assert sorted(inst.batch(len(inst), len(inst))) == sorted(first)  # the next pass
    # --prompts last-K: each user's last K training positions (fewer if it has fewer)
    for k in (1, 2):
        last = Instances(data, 20, seed=5, last=k).examples
        assert len(last) == int(np.clip(lens - 2 - FIRST_TARGET, 0, k).sum())
        for u in np.unique(last.user):
            seq = data.sequences[u]["items"]
            mine = last.target[last.user == u].tolist()
            assert mine == seq[max(FIRST_TARGET, len(seq) - 2 - k):len(seq) - 2]
    assert len(Instances(data, 20, seed=5, last=1)) < len(inst)


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_resume_is_exact(setup, tmp_path, mini_batches):
    from safetensors.torch import load_file

    from gream_fast import InvalidInputError

    root, _ = setup
    base = dict(model=str(root / "sft"), data=str(root / "data"), index=str(root / "index"),
                n=4, prompts_per_step=2, max_draws=2, lr=1e-3, warmup_steps=1, steps=2,
                save_every=0, device="cpu", mini_batches=mini_batches,
                # the second run also takes the other prompt set and rollouts
                prompts="all" if mini_batches == 1 else "last-2",
                rollout="sample" if mini_batches == 1 else "beam",
                credit="response" if mini_batches == 1 else "level")
    straight = train(SRPOConfig(out=str(tmp_path / "a"), **base), progress=False)
    half = train(SRPOConfig(out=str(tmp_path / "b"), stop_after=1, **base), progress=False)
    assert half["steps"] == 1 and half["final"] is None
    # --model takes a run without final/: its newest checkpoint
    assert model_dir(tmp_path / "b") == tmp_path / "b" / "checkpoint-1"
    assert model_dir(root / "sft") == root / "sft" / "final"
    with pytest.raises(InvalidInputError, match="--resume"):
        train(SRPOConfig(out=str(tmp_path / "b"), **base), progress=False)
    with pytest.raises(InvalidInputError, match="--lr"):
        train(SRPOConfig(out=str(tmp_path / "b"), resume=True, **{**base, "lr": 5e-4}),
              progress=False)
    rest = train(SRPOConfig(out=str(tmp_path / "b"), resume=True, **base), progress=False)
    assert rest["steps"] == straight["steps"] == 2
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("step", "lr", "draws", "kept_groups", "reward_mean", "loss", "kl", "grad_norm")
    ma, mb = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in "ab")
    assert [[m.get(k) for k in keys] for m in ma] == [[m.get(k) for k in keys] for m in mb]
    # one update per kept group at most: two groups a step
    assert all(m["updates"] == min(mini_batches, m["kept_groups"]) for m in ma if m["updated"])


def test_bad_inputs(setup, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, Qwen3Config

    from gream_fast.model.tiny import train_tokenizer

    root, _ = setup
    assert main(args(root, tmp_path / "r", "--mode", "reasoning", "--think-budget", "-1")) == 2
    assert "--think-budget: expected >= 0" in capsys.readouterr().err
    tokenizer = train_tokenizer(["the user bought an item"] * 10, vocab_size=300)
    cfg = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=16)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    good = args(root, tmp_path / "r")
    cases = [
        ("--model", tmp_path / "missing", "missing: no such folder"),
        ("--model", tmp_path, "no config.json"),
        ("--model", tmp_path / "plain", "has no token '<|a_"),
        ("--data", tmp_path / "nodata", "nodata: no such folder"),
        ("--index", tmp_path / "noindex", "noindex: no such file or folder"),
    ]
    for flag, value, message in cases:
        argv = list(good)
        argv[argv.index(flag) + 1] = str(value)
        assert main(argv) == 2, flag
        assert message in capsys.readouterr().err
    assert main(args(root, tmp_path / "r", "--n", "0")) == 2
    assert "--n: expected >= 1" in capsys.readouterr().err
    assert main(args(root, tmp_path / "r", "--mini-batches", "0")) == 2
    assert "--mini-batches: expected >= 1" in capsys.readouterr().err
    assert main(args(root, tmp_path / "r", "--rollout", "beam", "--mode", "reasoning")) == 2
    assert "--rollout: expected sample, or beam with --mode direct" in capsys.readouterr().err
    assert main(args(root, tmp_path / "r", "--credit", "level", "--mode", "reasoning")) == 2
    assert "--credit: expected response, or level with --mode direct" in capsys.readouterr().err
    assert main(args(root, tmp_path / "r", "--reward", "rank")) == 2  # sampled groups: no rank
    assert "--reward: expected residual, or rank with --rollout beam" in capsys.readouterr().err
    for bad in ("last-0", "first-3", "last"):
        assert main(args(root, tmp_path / "r", "--prompts", bad)) == 2
        assert "--prompts: expected all or last-K" in capsys.readouterr().err
    assert main(args(root, tmp_path / "r", "--best-metric", "mrr@10")) == 2
    assert "--best-metric: expected recall@K or ndcg@K" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's choices
        main(args(root, tmp_path / "r", "--mode", "think"))
    assert not (tmp_path / "r").exists()


def test_reasoning_mode_run(setup, tmp_path, monkeypatch):
    """`train srpo --mode reasoning`: CoT prompts, think-then-answer rollouts, gated rewards.
    A random policy never writes a think block, so every reward would be gated to 0 and no
    step would update: the run's think markers are relaxed to none (the gate itself is tested
    in test_gated_reward), leaving the answer's reward."""
    from dataclasses import replace

    from gream_fast.train import srpo_loop

    real = srpo_loop.think_format
    formats = []

    def relaxed(tokenizer, prompts):
        formats.append(replace(real(tokenizer, prompts), think_open=[], think_close=[]))
        return formats[-1]

    monkeypatch.setattr(srpo_loop, "think_format", relaxed)
    root, _ = setup
    run = tmp_path / "reason"
    summary = train(SRPOConfig(model=str(root / "sft"), data=str(root / "data"),
                               index=str(root / "index"), out=str(run), mode="reasoning",
                               think_budget=2, n=4, prompts_per_step=1, max_draws=2, lr=1e-3,
                               max_history=2, warmup_steps=1, steps=1, save_every=0,
                               device="cpu"),
                    progress=False)
    assert summary["steps"] == 1 and summary["final"] == str(run / "final")
    (m,) = read_jsonl(run / "metrics.jsonl")
    assert m["updated"] and np.isfinite(m["loss"]) and 0 < m["reward_mean"] <= 1
    # responses: <= 2 text tokens, the marker, the SID (LEVELS or LEVELS + 1), the end token
    (fmt,) = formats
    assert fmt.answer and fmt.stop
    assert LEVELS + 1 < m["response_len"] <= 2 + len(fmt.answer) + LEVELS + 2
    config = json.loads((run / "srpo_config.json").read_text())
    assert config["mode"] == "reasoning" and config["think_budget"] == 2
