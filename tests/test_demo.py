"""`gream-fast demo --quick` end to end on MovieLens-100K, then a rerun that reuses every output."""
import json
import time

import pytest

from gream_fast.cli import main
from gream_fast.demo import MODEL_STAGES, MODES, REPORT_KEYS


def _check_metrics(m):
    assert set(m) == set(REPORT_KEYS)
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in m.values())


@pytest.mark.slow
def test_demo_quick_end_to_end_and_resume(tmp_path, monkeypatch):
    # The demo tests the orchestration; under the Triton interpreter one SRPO step and a dozen
    # users' evaluation take minutes, so here the kernels take their torch references, as the
    # CLI does on a CPU (their own tests run them through the interpreter).
    from gream_fast.kernels import _backend

    monkeypatch.setattr(_backend, "INTERPRET", False)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    assert set(stages) == {"popularity", *MODEL_STAGES}
    _check_metrics(stages["popularity"])
    for name in MODEL_STAGES:
        assert set(stages[name]) == set(MODES)
        for mode in MODES:
            _check_metrics(stages[name][mode])
    v = report["srpo_validation"]
    assert 0.0 <= v["before"] <= v["after"] <= 1.0  # best/ never loses to the start
    assert [s for s, _ in v["curve"]] == [0, 1] and v["best_step"] in (0, 1)
    assert v["curve"][0][1] == v["before"] and dict(v["curve"])[v["best_step"]] == v["after"]
    # every evaluated model keeps its per-user rankings; the report pairs srpo with its start
    from gream_fast.demo import ranking_file

    valid = report["stages_valid"]
    for name in MODEL_STAGES:
        for mode in MODES:
            _check_metrics(valid[name][mode])
            for split in ("valid", "test"):
                assert ranking_file(out / "eval", name, mode, split).is_file()
    for other in ("sft_curriculum", "sft_continued"):  # its start, and the SFT control
        for mode in MODES:
            c = report[f"srpo_vs_{other}"][mode]
            d = c["diff"]["recall@10"]
            assert c["users"] > 0 and d["ci95"][0] <= d["mean"] <= d["ci95"][1]
            # the same users in both splits: pooled by user = the mean of the two splits'
            assert d["mean"] == pytest.approx(sum(
                (table["srpo"][mode]["recall@10"] - table[other][mode]["recall@10"]) / 2
                for table in (stages, valid)))
    md = (out / "report.md").read_text()
    assert "srpo - sft_curriculum" in md and "srpo - sft_continued" in md
    assert "validation and test pooled by user" in md and "profile quick" in md
    for svg in ("sft_loss.svg", "srpo_reward.svg", "srpo_valid.svg"):
        assert (out / svg).read_text().startswith("<svg") and svg in md
    assert "popularity" in md and "srpo" in md

    t0 = time.perf_counter()
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    assert time.perf_counter() - t0 < 30  # every stage reused
    assert json.loads((out / "report.json").read_text())["stages"] == stages


def test_profiles_and_overrides():
    """A profile's sizes, then explicit overrides; an unknown profile is refused by name."""
    from gream_fast.demo import FULL, make_config
    from gream_fast.errors import InvalidInputError

    full = make_config("runs/x", profile="full", seed=3)
    assert all(getattr(full, k) == v for k, v in FULL.items())
    assert (full.seed, full.profile) == (3, "full")
    assert make_config("runs/x", profile="full", num_beams=10).num_beams == 10
    assert make_config("runs/x", quick=True).profile == "quick"
    with pytest.raises(InvalidInputError, match="--profile.*'fast'"):
        make_config("runs/x", profile="fast")
