"""The CLI as a user meets it when something goes wrong: interruptions, bad numbers, outputs that
must not be written, and a model paired with an index it was not trained with. Every case runs
the command as typed and checks the exit code, that no traceback is printed, that the message
names the flag / file / field and what was expected, and that nothing else was changed."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gream_fast.cli import main
from gream_fast.index import SemanticIndex

from tiny_data import make_data_and_index

ROOT = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    """(exit code, stderr) of `gream-fast ARGV` in this process; stderr has no traceback."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- interruptions ------------------------------------------------------------------------------
def _start_synth(out: Path):
    cmd = [sys.executable, "-m", "gream_fast.cli", "data", "synth", "--users", "200000",
           "--items", "20000", "--out", str(out)]
    # Ctrl-C as in a terminal: a shell's background job (nohup, `&`) starts with SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler; the child must not
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(f".{out.name}.*.tmp")):  # writing: well inside main()
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"synth ended before its output was being written: {proc.communicate()}")
        time.sleep(0.01)
    return proc


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_and_sigterm_print_one_line_and_leave_nothing(tmp_path, sig, code, word):
    out = tmp_path / "synth"
    proc = _start_synth(out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines() == [err.strip()] and word in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no output, no temporaries


def test_sigkill_leftovers_are_removed_by_the_next_run(tmp_path, capsys):
    out = tmp_path / "synth"
    proc = _start_synth(out)
    proc.kill()
    proc.communicate(timeout=60)
    stale = list(tmp_path.glob(".synth.*.tmp"))
    assert stale  # SIGKILL cannot be caught: the temporary stays ...
    assert run(["data", "synth", "--users", "60", "--items", "30", "--out", out], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]  # ... until the next write


# -- numbers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A dataset, its index, SFT rows, and a tiny model folder that records the index."""
    from gream_fast.model.tiny import build_tiny
    from gream_fast.tasks.align import AlignConfig, AlignmentBuilder
    from gream_fast.tasks.context import TaskContext
    from gream_fast.files import write_jsonl

    root = tmp_path_factory.mktemp("rel")
    data, index = make_data_and_index(root)
    model, tok = build_tiny(root / "data", index, seed=0, vocab_size=400,
                            shape=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, head_dim=16,
                                       intermediate_size=64))
    model.save_pretrained(root / "model")  # build_tiny recorded the index
    tok.save_pretrained(root / "model")
    rows = AlignmentBuilder(TaskContext(data, index), AlignConfig(passes=1, tasks="seqrec")).build()
    write_jsonl(root / "rows.jsonl", rows[:6])
    return root, data, index


def sft_args(root, out, *more):
    return ["train", "sft", "--init", "tiny", "--data", root / "rows.jsonl", "--index",
            root / "index", "--data-dir", root / "data", "--out", out, "--max-steps", "2",
            "--save-every", "1", "--seq-len", "128", "--vocab-size", "300", "--device", "cpu",
            *more]


def test_learning_rates_must_be_positive_and_finite(tiny, tmp_path, capsys):
    root = tiny[0]
    for lr, message in [("nan", "--lr: expected a finite number, got nan"),
                        ("inf", "--lr: expected a finite number, got inf"),
                        ("0", "--lr: expected > 0, got 0.0"), ("-1e-3", "--lr: expected > 0")]:
        code, err = run(sft_args(root, tmp_path / "sft", f"--lr={lr}"), capsys)
        assert code == 2 and message in err, (lr, err)
    code, err = run(["train", "srpo", "--model", root / "model", "--data", root / "data",
                     "--index", root / "index", "--out", tmp_path / "srpo", "--lr", "0"], capsys)
    assert code == 2 and "--lr: expected > 0, got 0.0" in err
    code, err = run(["train", "srpo", "--model", root / "model", "--data", root / "data",
                     "--index", root / "index", "--out", tmp_path / "srpo", "--beta", "nan"],
                    capsys)
    assert code == 2 and "--beta: expected a finite number" in err
    assert not (tmp_path / "sft").exists() and not (tmp_path / "srpo").exists()


def test_beams_and_top_k_are_named(tiny, capsys):
    root = tiny[0]
    base = ["recommend", "--model", root / "model", "--index", root / "index", "--history",
            "1,2", "--device", "cpu"]
    code, err = run([*base, "--num-beams", "0"], capsys)
    assert code == 2 and "--num-beams: expected >= 1, got 0" in err
    code, err = run([*base, "--num-beams", "4", "--top-k", "6"], capsys)
    assert code == 2 and "--top-k: expected at most --num-beams (4), got 6" in err
    code, err = run(["eval", "--model", root / "model", "--index", root / "index", "--data",
                     root / "data", "--ks", "1,10", "--num-beams", "4"], capsys)
    assert code == 2 and "--num-beams: expected >= 10, got 4" in err


# -- training rows ------------------------------------------------------------------------------
def test_bad_training_rows_name_file_and_line(tiny, tmp_path, capsys):
    root = tiny[0]
    good = (root / "rows.jsonl").read_text().splitlines()
    cases = {
        "list.jsonl": ([good[0], "[1, 2]"], "list.jsonl:2: expected a JSON object with a "
                                            "'messages' list, got list"),
        "role.jsonl": ([good[0], good[1], '{"messages": [{"role": "user", "content": "x"}, '
                                          '{"role": "assistant", "content": 7}]}'],
                       "role.jsonl:3: messages[1]: expected {'role': str, 'content': str}"),
        "nan.jsonl": ([good[0], '{"messages": NaN}'], "nan.jsonl:2: not valid JSON (NaN is "
                                                      "not JSON)"),
        "deep.jsonl": (["[" * 100000 + "]" * 100000], "deep.jsonl:1: JSON nested too deeply"),
    }
    for name, (lines, message) in cases.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        args = sft_args(root, tmp_path / "run", "--data", tmp_path / name)
        code, err = run(args, capsys)
        assert code == 2 and message in err, (name, err)
    (tmp_path / "bin.jsonl").write_bytes(bytes(range(128, 256)) * 8)
    code, err = run(sft_args(root, tmp_path / "run", "--data", tmp_path / "bin.jsonl"), capsys)
    assert code == 2 and "bin.jsonl:1: not UTF-8 text" in err


# -- outputs ------------------------------------------------------------------------------------
def test_outputs_that_must_not_be_written(tiny, tmp_path, capsys):
    root, data, index = tiny
    before = digest(root)
    align = ["tasks", "align", "--data", root / "data", "--index", root / "index", "--tasks",
             "seqrec"]
    # a folder where a file goes; a parent that is a file; the input itself; inside /proc
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("keep me")
    for out, message in [(tmp_path / "dir", "a folder; expected a file path"),
                         (tmp_path / "file" / "rows.jsonl", "file is a file, not a folder"),
                         (root / "data", "is the input"),
                         (root, "holds the input")]:
        code, err = run([*align, "--out", out], capsys)
        assert code == 2 and str(out) in err and message in err, (out, err)
    code, err = run([*align, "--out", "/proc/gream-fast-test/rows.jsonl"], capsys)
    assert code in (1, 2) and "/proc" in err  # the file system refuses: named, no traceback
    # a run folder that holds someone else's files
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    code, err = run(sft_args(root, tmp_path / "mine"), capsys)
    assert code == 2 and "a folder with files that `gream-fast train sft` did not write" in err
    assert (tmp_path / "file").read_text() == "keep me"
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    assert digest(root) == before


# -- model and index ----------------------------------------------------------------------------
def test_a_model_runs_only_with_its_own_index(tiny, tmp_path, capsys):
    root, data, index = tiny
    perm = np.random.default_rng(1).permutation(index.num_items)
    other = SemanticIndex(index.codes[perm], index.extra[perm], index.codebook_size)
    other.save(tmp_path / "permuted.safetensors")
    subset = SemanticIndex(index.codes[:-2], index.extra[:-2], index.codebook_size)
    subset.save(tmp_path / "subset.safetensors")
    base = ["recommend", "--model", root / "model", "--history", "1,2", "--num-beams", "4",
            "--top-k", "2", "--device", "cpu"]
    for path in (tmp_path / "permuted.safetensors", tmp_path / "subset.safetensors"):
        code, err = run([*base, "--index", path], capsys)
        assert code == 2 and f"--index {path}" in err and "--allow-index-mismatch" in err
        assert "is not the index" in err and index.fingerprint() in err
    code, err = run(["eval", "--model", root / "model", "--index", tmp_path /
                     "permuted.safetensors", "--data", root / "data", "--ks", "1",
                     "--num-beams", "2", "--max-users", "2", "--device", "cpu"], capsys)
    assert code == 2 and "is not the index" in err
    code, err = run([*base, "--index", tmp_path / "permuted.safetensors",
                     "--allow-index-mismatch"], capsys)
    assert code == 0 and "warning:" in err and "running anyway" in err
    assert run([*base, "--index", root / "index"], capsys)[0] == 0
    code, err = run(["train", "srpo", "--model", root / "model", "--data", root / "data",
                     "--index", tmp_path / "permuted.safetensors", "--out", tmp_path / "srpo",
                     "--steps", "1", "--device", "cpu"], capsys)
    assert code == 2 and "is not the index" in err


def test_sft_records_the_index_and_resume_checks_it(tiny, tmp_path, capsys):
    root, data, index = tiny
    assert run(sft_args(root, tmp_path / "run"), capsys)[0] == 0
    rec = json.loads((tmp_path / "run" / "final" / "config.json").read_text())["gream_index"]
    assert rec["fingerprint"] == index.fingerprint() and rec["items"] == index.num_items
    perm = np.random.default_rng(2).permutation(index.num_items)
    SemanticIndex(index.codes[perm], index.extra[perm], index.codebook_size).save(
        tmp_path / "permuted.safetensors")
    half = sft_args(root, tmp_path / "half", "--stop-after", "1")
    assert run(half, capsys)[0] == 0
    code, err = run(sft_args(root, tmp_path / "half", "--resume", "--index",
                             tmp_path / "permuted.safetensors"), capsys)
    assert code == 2 and "is not the index" in err


# -- resume -------------------------------------------------------------------------------------
def test_resume_accepts_the_same_folder_by_another_path_or_moved(tiny, tmp_path, capsys,
                                                                  monkeypatch):
    root = tiny[0]
    monkeypatch.chdir(tmp_path)
    assert run(sft_args(root, "half", "--stop-after", "1"), capsys)[0] == 0
    code, err = run(sft_args(root, tmp_path / "half", "--resume"), capsys)  # absolute now
    assert code == 0, err
    assert run(sft_args(root, "moved", "--stop-after", "1"), capsys)[0] == 0
    os.rename(tmp_path / "moved", tmp_path / "elsewhere")
    code, err = run(sft_args(root, tmp_path / "elsewhere", "--resume"), capsys)
    assert code == 0 and (tmp_path / "elsewhere" / "final").is_dir(), err


def test_resume_skips_a_corrupt_newest_checkpoint(tiny, tmp_path, capsys):
    from safetensors.torch import load_file

    root = tiny[0]
    args = sft_args(root, tmp_path / "run", "--max-steps", "3", "--stop-after", "2",
                    "--keep-checkpoints", "0")
    assert run(args, capsys)[0] == 0
    weights = tmp_path / "run" / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    code, err = run(sft_args(root, tmp_path / "run", "--max-steps", "3", "--resume",
                             "--keep-checkpoints", "0"), capsys)
    assert code == 0, err
    assert "skipped checkpoint-2 (model.safetensors:" in err and "checkpoint-1" in err
    assert load_file(tmp_path / "run" / "final" / "model.safetensors")
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3]  # step 2 was redone from checkpoint-1, not lost nor doubled
    for ckpt in ("checkpoint-1", "checkpoint-2", "checkpoint-3"):  # every one now unreadable
        (tmp_path / "run" / ckpt / "trainer_state.json").write_text("{")
    code, err = run(sft_args(root, tmp_path / "run", "--max-steps", "3", "--resume"), capsys)
    assert code == 2 and "no intact checkpoint" in err and "trainer_state.json" in err
