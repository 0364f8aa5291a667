"""The benchmarks run (quick sizes, two timed calls) and write their JSON record: they check
their own answers against the baselines, so this also guards the baselines' agreement."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# bench_advantage is left out: under the interpreter it would time Triton in Python (minutes);
# gpu_check.sh runs it on a GPU.
@pytest.mark.parametrize("name", ["bench_trie", "bench_data", "bench_fused_cpu"])
def test_benchmark_runs_and_records(name, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    module = __import__(f"benchmarks.{name}", fromlist=["main"])
    module.main(["--quick", "--repeat", "2", "--out", str(tmp_path), "--device", "cpu"])
    (record,) = tmp_path.glob("*.json")
    data = json.loads(record.read_text())
    assert data["rows"] and all(r["time_ms"] > 0 for r in data["rows"])
    assert "ratio" in capsys.readouterr().out


@pytest.mark.slow  # 1-2 min on a loaded 2-core CPU (TRL import, 3 steps of each): not < 30 s
@pytest.mark.parametrize("mode", ["direct", "reasoning"])
def test_bench_srpo_runs_against_trl(mode, tmp_path, monkeypatch, capsys):
    """bench_srpo at its quick size, one timed step: ours and TRL's GRPOTrainer both step and
    the record holds a row for each (TRL is a baseline-only dependency: skipped without it).
    Reasoning mode runs with --trace: each worker writes a profiler trace, ours naming every
    phase a user profiles, from the rollout to the optimizer step."""
    pytest.importorskip("trl", reason="trl (requirements-cpu.txt) is not installed")
    pytest.importorskip("datasets", reason="datasets (a trl dependency) is not installed")
    monkeypatch.delenv("OUT", raising=False)
    from benchmarks import bench_srpo

    trace = ["--trace", str(tmp_path / "trace")] if mode == "reasoning" else []
    bench_srpo.main(["--quick", "--repeat", "1", "--out", str(tmp_path), "--device", "cpu",
                     "--mode", mode, *trace])
    (record,) = tmp_path.glob("*.json")
    rows = json.loads(record.read_text())["rows"]
    assert [r["impl"].split()[0] for r in rows] == ["TRL", "ours"]
    assert all(r["time_ms"] > 0 for r in rows) and rows[1]["ratio"] > 0
    assert "kept groups 4/4" in rows[1]["notes"]  # the same work: every group updated
    assert "ratio" in capsys.readouterr().out
    if trace:
        assert (tmp_path / "trace" / "srpo-trl.trace.json").stat().st_size > 0
        names = _trace_names(tmp_path / "trace" / "srpo-ours.trace.json")
        assert {"gream.rollout", "gream.prefill", "gream.decode", "gream.reason.step",
                "gream.reward", "gream.advantage", "gream.logprob_pass", "gream.loss",
                "gream.backward", "gream.optimizer"} <= names


def _trace_names(path) -> set:
    return {e.get("name") for e in json.loads(Path(path).read_text())["traceEvents"]}


@pytest.mark.usefixtures("torch_kernels")
def test_bench_generate_reasoning_case_and_its_trace(tmp_path, monkeypatch):
    """The reasoning-rollout case times HF generate and ours on the same rows (tokens/s both),
    and --trace writes a profiler trace that names the engine's phases."""
    import argparse

    from benchmarks import bench_generate
    from benchmarks.harness import Bench, common_args

    monkeypatch.delenv("OUT", raising=False)
    args = common_args(argparse.ArgumentParser()).parse_args(
        ["--repeat", "1", "--out", str(tmp_path / "out"), "--trace", str(tmp_path / "trace"),
         "--device", "cpu"])
    bench = Bench("generate", args)
    with bench.profiling():
        bench_generate.reasoning_case(bench, args, "tiny-small", 2, 2, 8, 6, n_items=100)
    hf, ours = bench.rows
    assert hf["impl"].startswith("HF generate") and ours["impl"].startswith("ours")
    assert hf["unit"] == ours["unit"] == "tokens/s" and ours["ratio"] > 0
    # each row: up to 6 think tokens, the 3-token marker, a SID and its end token
    assert 4 <= float(ours["notes"].split()[0]) <= 6 + 3 + 6
    assert "100% of rows a real item" in ours["notes"]
    (path,) = (tmp_path / "trace").glob("generate-*.trace.json")
    names = _trace_names(path)
    assert {"gream.prefill", "gream.decode", "gream.reason.step", "gream.trie_mask"} <= names
