"""The benchmarks run (quick sizes, two timed calls) and write their JSON record: they check
their own answers against the baselines, so this also guards the baselines' agreement."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# bench_advantage is left out: under the interpreter it would time Triton in Python (minutes);
# gpu_check.sh runs it on a GPU.
@pytest.mark.parametrize("name", ["bench_trie", "bench_data"])
def test_benchmark_runs_and_records(name, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    module = __import__(f"benchmarks.{name}", fromlist=["main"])
    module.main(["--quick", "--repeat", "2", "--out", str(tmp_path), "--device", "cpu"])
    (record,) = tmp_path.glob("*.json")
    data = json.loads(record.read_text())
    assert data["rows"] and all(r["time_ms"] > 0 for r in data["rows"])
    assert "ratio" in capsys.readouterr().out


@pytest.mark.slow  # 1-2 min on a loaded 2-core CPU (TRL import, 3 steps of each): not < 30 s
def test_bench_srpo_runs_against_trl(tmp_path, monkeypatch, capsys):
    """bench_srpo at its quick size, one timed step: ours and TRL's GRPOTrainer both step and
    the record holds a row for each (TRL is a baseline-only dependency: skipped without it)."""
    pytest.importorskip("trl", reason="trl (requirements-cpu.txt) is not installed")
    pytest.importorskip("datasets", reason="datasets (a trl dependency) is not installed")
    monkeypatch.delenv("OUT", raising=False)
    from benchmarks import bench_srpo

    bench_srpo.main(["--quick", "--repeat", "1", "--out", str(tmp_path), "--device", "cpu"])
    (record,) = tmp_path.glob("*.json")
    rows = json.loads(record.read_text())["rows"]
    assert [r["impl"].split()[0] for r in rows] == ["TRL", "ours"]
    assert all(r["time_ms"] > 0 for r in rows) and rows[1]["ratio"] > 0
    assert "kept groups 4/4" in rows[1]["notes"]  # the same work: every group updated
    assert "ratio" in capsys.readouterr().out
