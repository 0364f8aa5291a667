import json

import numpy as np
import pytest

from gream_fast import GreamError
from gream_fast.cli import main
from gream_fast.data import Dataset
from gream_fast.data.prepare import prepare, write
from gream_fast.data.synth import SynthConfig, synthesize


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    write(prepare(synthesize(SynthConfig(users=300, items=120, seed=4))), out)
    return out


def test_leave_one_out_split(synth_dir):
    data = Dataset.load(synth_dir)
    split = data.split(max_history=5)
    want_train, want_valid, want_test = [], [], []
    for s in data.sequences:
        seq, u = s["items"], s["user_id"]
        for t in range(1, len(seq) - 2):
            want_train.append((u, seq[max(0, t - 5):t], seq[t]))
        want_valid.append((u, seq[:-2][-5:], seq[-2]))
        want_test.append((u, seq[:-1][-5:], seq[-1]))
    assert list(split.train) == want_train
    assert list(split.valid) == want_valid
    assert list(split.test) == want_test
    assert split.train.history.shape[1] == 5
    assert (split.train.history[split.train.history_len < 5, -1] == -1).all()


def test_default_history_is_the_datasets(synth_dir):
    split = Dataset.load(synth_dir).split()
    assert split.test.history.shape[1] == 20


def test_load_rejects_broken_folders(tmp_path, synth_dir):
    with pytest.raises(GreamError, match="no items.jsonl"):
        Dataset.load(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "items.jsonl").write_text((synth_dir / "items.jsonl").read_text())
    rows = (synth_dir / "sequences.jsonl").read_text().splitlines()
    row = json.loads(rows[2])
    row["items"][0] = 10_000
    rows[2] = json.dumps(row)
    (bad / "sequences.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(GreamError, match=r"sequences.jsonl:3: item id 10000 is not in items.jsonl"):
        Dataset.load(bad)
    rows[2] = "{not json"
    (bad / "sequences.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(GreamError, match=r"sequences.jsonl:3: not valid JSON"):
        Dataset.load(bad)


def test_synth_has_planted_structure():
    raw = synthesize(SynthConfig(users=400, items=300, seed=1))
    again = synthesize(SynthConfig(users=400, items=300, seed=1))
    assert raw.users == again.users and raw.items == again.items  # seeded
    group = {a: m["categories"][1] for a, m in raw.meta.items()}
    per_user = {}
    for u, i in zip(raw.users, raw.items):
        per_user.setdefault(u, []).append(group[i])
    assert max(len(set(g)) for g in per_user.values()) <= 3
    # users mostly stay in a group: consecutive items share it far above chance (1 / groups)
    same = np.mean([a == b for g in per_user.values() for a, b in zip(g, g[1:])])
    assert same > 0.6
    # a group's items share vocabulary: titles of one group reuse few distinct words
    words = {}
    for a, m in raw.meta.items():
        words.setdefault(group[a], set()).update(m["title"].lower().split()[:2])
    assert all(len(w) <= 12 for w in words.values())


def test_cli_prepare_and_synth(tmp_path, capsys):
    assert main(["data", "synth", "--users", "200", "--items", "80", "--out", str(tmp_path / "s")]) == 0
    assert Dataset.load(tmp_path / "s").num_users > 150
    assert main(["data", "synth", "--users", "200", "--items", "80", "--as-amazon2014",
                 "--out", str(tmp_path / "raw")]) == 0
    assert main(["data", "prepare", "--format", "amazon2014", "--input", str(tmp_path / "raw"),
                 "--category", "Synthetic", "--k-core", "3", "--out", str(tmp_path / "a")]) == 0
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["k_core"] == 3 and cfg["category"] == "Synthetic"
    assert main(["data", "prepare", "--format", "movielens", "--input", str(tmp_path),
                 "--out", str(tmp_path / "m")]) == 2
    assert "not a MovieLens folder" in capsys.readouterr().err
