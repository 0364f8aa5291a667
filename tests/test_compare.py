"""`gream-fast compare`: the paired bootstrap comparison of two evaluated models, from the
per-user ranking files evaluate() writes, against values computed here by hand."""
import json

import numpy as np
import pytest

from gream_fast import GreamError
from gream_fast.cli import main
from gream_fast.eval.compare import compare
from gream_fast.files import write_jsonl

USERS = 40


def write_run(folder, ranks_by_split, items=20, k=5):
    """An evaluation folder whose user u has its target at 1-based rank ranks[u] (0: absent
    from its ranking of k items)."""
    for split, ranks in ranks_by_split.items():
        rows = []
        for u, r in enumerate(ranks):
            target = u % items
            others = [i for i in range(items) if i != target][:k]
            if r:
                others.insert(r - 1, target)
            rows.append({"user": u, "target": target, "ranked": others[:k],
                         "scores": [0.0] * k})
        write_jsonl(folder / f"eval_{split}_rankings.jsonl", rows)
    return folder


def hits(ranks, k):
    r = np.asarray(ranks)
    hit = (r > 0) & (r <= k)
    return hit, np.where(hit, 1 / np.log2(np.maximum(r, 1) + 1.0), 0.0)


def test_means_differences_and_the_pooling_by_user(tmp_path):
    rng = np.random.default_rng(0)
    ranks = {name: {s: rng.integers(0, 6, USERS).tolist() for s in ("valid", "test")}
             for name in ("a", "b")}
    a, b = (write_run(tmp_path / n, ranks[n]) for n in "ab")
    out = compare([a], [b], k=5, samples=2000)
    # by hand: each user's value is the mean of its valid and test metric
    rec = {n: np.mean([hits(ranks[n][s], 5)[0] for s in ("valid", "test")], 0) for n in "ab"}
    ndcg = {n: np.mean([hits(ranks[n][s], 5)[1] for s in ("valid", "test")], 0) for n in "ab"}
    assert out["users"] == USERS and out["a"]["recall@5"] == pytest.approx(rec["a"].mean())
    assert out["b"]["ndcg@5"] == pytest.approx(ndcg["b"].mean())
    d = out["diff"]["recall@5"]
    assert d["mean"] == pytest.approx((rec["a"] - rec["b"]).mean())
    lo, hi = d["ci95"]
    assert lo <= d["mean"] <= hi and lo < hi
    # the bootstrap interval is about mean +- 1.96 standard errors of the per-user differences
    se = (rec["a"] - rec["b"]).std(ddof=1) / np.sqrt(USERS)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert compare([a], [b], k=5, samples=2000) == out  # seeded
    assert compare([a], [b], k=5, samples=2000, seed=1)["diff"] != out["diff"]


def test_a_clear_winner_identical_runs_and_seeds_averaged(tmp_path):
    good = [1] * 30 + [0] * 10  # a hit at rank 1 for 30 of 40 users
    bad = [0] * 35 + [1] * 5
    a = write_run(tmp_path / "a", {"test": good})
    b = write_run(tmp_path / "b", {"test": bad})
    out = compare([a], [b], k=5, splits=["test"], samples=1000)
    assert out["diff"]["recall@5"]["ci95"][0] > 0 and out["diff"]["recall@5"]["p_not_better"] == 0
    same = compare([a], [a], k=5, splits=["test"], samples=1000)["diff"]["ndcg@5"]
    assert same == {"mean": 0.0, "ci95": [0.0, 0.0], "p_not_better": 1.0}
    # two seeds of a: each user's value is the mean of the two
    a2 = write_run(tmp_path / "a2", {"test": [2] * 40})
    both = compare([a, a2], [b], k=5, splits=["test"], samples=1000)
    want = (np.asarray(good) + 1 / np.log2(3)) / 2
    assert both["a"]["ndcg@5"] == pytest.approx(want.mean())


def test_what_cannot_be_compared(tmp_path):
    a = write_run(tmp_path / "a", {"test": [1] * USERS})
    fewer = write_run(tmp_path / "fewer", {"test": [1] * (USERS - 1)})
    with pytest.raises(GreamError, match=f"user {USERS - 1} is in one only"):
        compare([a], [fewer], k=5, splits=["test"])
    other = write_run(tmp_path / "other", {"test": [1] * USERS}, items=7)  # other targets
    with pytest.raises(GreamError, match="target differs"):
        compare([a], [other], k=5, splits=["test"])
    with pytest.raises(GreamError, match="eval_valid_rankings.jsonl: no such file"):
        compare([a], [a], k=5)
    with pytest.raises(GreamError, match="a ranking of 5 items cannot give metrics@10"):
        compare([a], [a], k=10, splits=["test"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "eval_test_rankings.jsonl").write_text('{"user": 0, "target": 1}\n')
    with pytest.raises(GreamError, match=r"eval_test_rankings.jsonl:1: expected an object"):
        compare([a], [tmp_path / "bad"], k=5, splits=["test"])
    with pytest.raises(GreamError, match="--splits"):
        compare([a], [a], k=5, splits=["train"])


def test_cli(tmp_path, capsys):
    rng = np.random.default_rng(1)
    runs = [write_run(tmp_path / n, {s: rng.integers(0, 6, USERS).tolist()
                                     for s in ("valid", "test")}) for n in ("a1", "a2", "b")]
    out = tmp_path / "cmp.json"
    assert main(["compare", f"{runs[0]},{runs[1]}", str(runs[2]), "--k", "5",
                 "--samples", "500", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["a"]["runs"] == [str(runs[0]), str(runs[1])] and printed["users"] == USERS
    assert printed == compare(runs[:2], runs[2:], k=5, samples=500)
    assert main(["compare", str(runs[0]), str(tmp_path / "missing"), "--k", "5"]) == 2
    assert "no such file" in capsys.readouterr().err
