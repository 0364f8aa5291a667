"""Evaluation: Recall@K / NDCG@K against a hand-checked case and a plain loop, then evaluate()
and the `eval` / `recommend` commands end to end on a tiny random Qwen3 saved to disk with a
BPE tokenizer trained here offline (ChatML tokens + SID tokens) and a small synthetic dataset."""
import json
import math

import numpy as np
import pytest
import torch

from gream_fast import InvalidInputError
from gream_fast.cli import main
from gream_fast.eval import evaluate, recall_ndcg
from gream_fast.files import read_jsonl
from gream_fast.index import SemanticIndex
from tiny_data import K, make_data_and_index, make_tiny_model

# -- metrics ----------------------------------------------------------------------------------


def test_hand_checked_case():
    ranked = [[3, 1, 2, 0, 5],     # target 1 at rank 2
              [7, 0, 1, 2, 3],     # target 7 at rank 1
              [-1, 4, 0, 1, 2],    # an invalid SID first, then the target 4: rank 2
              [0, 1, 2, 3, 5],     # target 9 absent
              [0, 1, 2, 3, 8]]     # target 8 at rank 5
    targets = [1, 7, 4, 9, 8]
    m = recall_ndcg(np.array(ranked), np.array(targets), ks=(1, 3, 5))
    inv3, inv6 = 1 / math.log2(3), 1 / math.log2(6)  # 0.6309..., 0.3868...
    expected = {"recall@1": 0.2, "ndcg@1": 0.2,
                "recall@3": 0.6, "ndcg@3": (2 * inv3 + 1) / 5,   # 0.452372
                "recall@5": 0.8, "ndcg@5": (2 * inv3 + 1 + inv6) / 5}  # 0.529742
    assert list(m) == list(expected)
    assert m == pytest.approx(expected, abs=1e-12)
    assert m["ndcg@3"] == pytest.approx(0.4523719, abs=1e-7)
    assert m["ndcg@5"] == pytest.approx(0.5297425, abs=1e-7)
    assert all(type(v) is float for v in m.values())
    # torch tensors and lists work the same; an invalid id equal to a "target" never counts
    assert recall_ndcg(torch.tensor(ranked), torch.tensor(targets), ks=(1, 3, 5)) == m
    assert recall_ndcg([[-1, 2]], [2], ks=(1,)) == {"recall@1": 0.0, "ndcg@1": 0.0}


def brute_force(ranked, targets, ks):
    out = {}
    for k in ks:
        rec, ndcg = [], []
        for row, t in zip(ranked, targets):
            rank = next((j + 1 for j, item in enumerate(row) if item >= 0 and item == t), None)
            hit = rank is not None and rank <= k
            rec.append(1.0 if hit else 0.0)
            ndcg.append(1.0 / math.log2(rank + 1) if hit else 0.0)
        out[f"recall@{k}"], out[f"ndcg@{k}"] = sum(rec) / len(rec), sum(ndcg) / len(ndcg)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_random_rankings_match_a_loop(seed):
    rng = np.random.default_rng(seed)
    users, width, items = int(rng.integers(1, 300)), int(rng.integers(10, 16)), 25
    ranked = rng.integers(-1, items, size=(users, width))  # repeats and invalid ids included
    targets = rng.integers(0, items, size=users)
    for ks in [(1, 5, 10), (10, 2), (width,)]:
        assert recall_ndcg(ranked, targets, ks) == pytest.approx(
            brute_force(ranked.tolist(), targets.tolist(), ks), abs=1e-12)


def test_metric_errors():
    ranked, targets = np.zeros((3, 5), np.int64), np.zeros(3, np.int64)
    with pytest.raises(InvalidInputError, match="ranking width 5"):
        recall_ndcg(ranked, targets, ks=(1, 10))
    with pytest.raises(InvalidInputError, match="3 rows but targets 2"):
        recall_ndcg(ranked, targets[:2], ks=(1,))
    with pytest.raises(InvalidInputError, match="integer item ids"):
        recall_ndcg(ranked.astype(float), targets, ks=(1,))
    with pytest.raises(InvalidInputError, match="targets"):
        recall_ndcg(ranked, -targets - 1, ks=(1,))
    with pytest.raises(InvalidInputError, match="no users"):
        recall_ndcg(np.zeros((0, 5), np.int64), np.zeros(0, np.int64), ks=(1,))
    for bad in [(), (0, 1), (1, 1), (1.5,)]:
        with pytest.raises(InvalidInputError, match="ks"):
            recall_ndcg(ranked, targets, ks=bad)


# -- evaluate() and the CLI on a tiny saved model -----------------------------------------------
BEAMS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data, index = make_data_and_index(root, users=40)
    model, tokenizer = make_tiny_model(root, index)
    return root, data, index, model, tokenizer


def test_prompts_are_the_training_prompts(setup):
    """The eval prompt of a history has exactly the token ids SFT saw before the answer in a
    seqrec row with the same (first) template."""
    from gream_fast.eval.evaluate import SeqRecPrompts
    from gream_fast.tasks.align import AlignConfig, AlignmentBuilder
    from gream_fast.tasks.chat import IGNORE_INDEX, ChatEncoder
    from gream_fast.tasks.context import TaskContext, rng_for
    from gream_fast.tasks.templates import TEMPLATES

    _, data, index, _, tokenizer = setup
    builder = AlignmentBuilder(TaskContext(data, index), AlignConfig())
    rows = []
    builder.seqrec(rng_for(0, "seqrec", 0), rows)
    head = TEMPLATES["seqrec"][0].prompt.split("{")[0]
    picked = [e for e, r in enumerate(rows) if r["messages"][1]["content"].startswith(head)]
    assert len(picked) >= 3
    prompts, encoder = SeqRecPrompts(tokenizer, index), ChatEncoder(tokenizer)
    for e in picked[:5]:
        _, history, _ = builder.examples[e]
        ex = encoder.encode(rows[e])
        n = next(j for j, label in enumerate(ex["labels"]) if label != IGNORE_INDEX)
        assert tokenizer(prompts(history), add_special_tokens=False)["input_ids"] == ex["input_ids"][:n]
    # the answer ends with the end-of-turn token, so beam search stops on it, not on EOS
    assert prompts.stop_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert prompts.stop_token_id != tokenizer.eos_token_id


def test_evaluate_end_to_end(setup, tmp_path):
    _, data, index, model, tokenizer = setup
    ks, users = (1, 2, BEAMS), 5
    metrics = evaluate(model, tokenizer, data, index, ks=ks, num_beams=BEAMS, batch_size=3,
                       out=tmp_path, max_users=users, progress=False)
    rows = read_jsonl(tmp_path / "eval_test_rankings.jsonl")
    assert [r["user"] for r in rows] == list(range(users))
    for r in rows:
        seq = data.sequences[r["user"]]["items"]
        assert r["target"] == seq[-1]
        assert len(r["ranked"]) == len(set(r["ranked"])) == BEAMS
        assert all(0 <= i < data.num_items for i in r["ranked"])
        assert r["scores"] == sorted(r["scores"], reverse=True)
    recomputed = recall_ndcg([r["ranked"] for r in rows], [r["target"] for r in rows], ks)
    assert metrics == recomputed
    saved = json.loads((tmp_path / "eval_test_metrics.json").read_text())
    assert {k: saved[k] for k in metrics} == metrics and saved["users"] == users

    # the rankings are those of recommend() on the same prompts, one batch or another
    from gream_fast.eval.evaluate import SeqRecPrompts, build_constraint
    from gream_fast.generate import recommend

    prompts = SeqRecPrompts(tokenizer, index)
    test = data.split().test
    texts = [prompts(test[u][1]) for u in range(users)]
    items, _ = recommend(model, tokenizer, build_constraint(tokenizer, index, prompts, "cpu"),
                         texts, num_beams=BEAMS, top_k=BEAMS)
    assert items.tolist() == [r["ranked"] for r in rows]

    # a constraint and a runner built once can be passed in (a training loop evaluating often)
    from gream_fast.model import make_runner

    constraint = build_constraint(tokenizer, index, prompts, "cpu")
    again = evaluate(model, tokenizer, data, constraint, ks=ks, num_beams=BEAMS, max_users=2,
                     out=tmp_path / "again", runner=make_runner(model), progress=False)
    rows2 = read_jsonl(tmp_path / "again" / "eval_test_rankings.jsonl")
    assert [r["ranked"] for r in rows2] == [r["ranked"] for r in rows[:2]]
    for a, b in zip(rows2, rows):  # another batching: the same ranks, scores up to rounding
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    assert again == recall_ndcg([r["ranked"] for r in rows2], [r["target"] for r in rows2], ks)


def test_evaluate_reasoning_mode(setup, tmp_path):
    _, data, index, model, tokenizer = setup
    users = 3
    metrics = evaluate(model, tokenizer, data, index, mode="reasoning", ks=(1, BEAMS),
                       num_beams=BEAMS, out=tmp_path, max_users=users, progress=False,
                       think_budget=5, temperature=0)
    rows = read_jsonl(tmp_path / "eval_test_rankings.jsonl")
    assert metrics == recall_ndcg([r["ranked"] for r in rows], [r["target"] for r in rows],
                                  (1, BEAMS))
    for r in rows:  # a random model never writes <answer> itself: the budget forces it
        assert r["reasoning"].endswith("<answer>")
        assert len(set(r["ranked"])) == BEAMS and all(0 <= i < data.num_items for i in r["ranked"])
    again = evaluate(model, tokenizer, data, index, mode="reasoning", ks=(1, BEAMS),
                     num_beams=BEAMS, max_users=users, progress=False, think_budget=5,
                     temperature=0)
    assert again == metrics


def test_evaluate_rejects_bad_settings(setup):
    _, data, index, model, tokenizer = setup
    with pytest.raises(InvalidInputError, match="mode"):
        evaluate(model, tokenizer, data, index, mode="thinking")
    with pytest.raises(InvalidInputError, match="num_beams"):
        evaluate(model, tokenizer, data, index, ks=(1, 5, 10), num_beams=5)
    with pytest.raises(InvalidInputError, match="split"):
        evaluate(model, tokenizer, data, index, split="train")
    other = SemanticIndex.from_codes(np.arange(data.num_items + 1)[:, None] % K, K)
    with pytest.raises(InvalidInputError, match="same items"):
        evaluate(model, tokenizer, data, other)


def test_cli_eval_and_recommend(setup, tmp_path, capsys):
    root, data, index, _, _ = setup
    common = ["--model", str(root / "model"), "--index", str(root / "index"), "--num-beams",
              str(BEAMS), "--device", "cpu"]
    run = tmp_path / "run"
    assert main(["eval", *common, "--data", str(root / "data"), "--ks", "1,3", "--split", "valid",
                 "--max-users", "3", "--batch-size", "2", "--score", "sid", "--out", str(run)]) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = read_jsonl(run / "eval_valid_rankings.jsonl")
    assert len(rows) == 3 and all(r["target"] == data.sequences[r["user"]]["items"][-2] for r in rows)
    assert printed == recall_ndcg([r["ranked"] for r in rows], [r["target"] for r in rows], (1, 3))
    config = json.loads((run / "eval_valid_config.json").read_text())
    assert config["score"] == "sid" and config["num_beams"] == BEAMS and config["ks"] == "1,3"
    assert json.loads((run / "eval_valid_metrics.json").read_text())["score"] == "sid"

    assert main(["recommend", *common, "--history", "0,3,5", "--top-k", "3",
                 "--data", str(root / "data")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "rank\titem\tscore\ttitle" and len(lines) == 4
    items = [int(line.split("\t")[1]) for line in lines[1:]]
    assert len(set(items)) == 3
    for line, item in zip(lines[1:], items):
        assert line.split("\t")[3] == data.items[item]["title"]

    # errors name what is wrong
    assert main(["recommend", *common, "--history", "0,999"]) == 2
    assert "--history: item 999" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's choices
        main(["eval", *common, "--data", str(root / "data"), "--mode", "bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    plain = ["--model", str(root / "plain"), "--index", str(root / "index"), "--num-beams",
             str(BEAMS)]
    assert main(["recommend", *plain, "--history", "1,2"]) == 2
    assert "tokenizer has no token '<|a_1|>'" in capsys.readouterr().err


def test_missing_model_folder(setup, tmp_path, capsys):
    root = setup[0]
    assert main(["recommend", "--model", str(tmp_path), "--index", str(root / "index"),
                 "--history", "1"]) == 2
    assert "no config.json" in capsys.readouterr().err
