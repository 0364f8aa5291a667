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
