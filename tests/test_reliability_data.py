"""`gream-fast data prepare` against bad input, as a user types it: every mistake exits 2 with a
message naming the file / line / flag and no traceback, no input or unrelated file changes, and
nothing writes wrong output (a fuzz test feeds every reader mutated files)."""
import gzip
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gream_fast import GreamError
from gream_fast.cli import main
from gream_fast.data import Dataset, PrepareConfig, run
from gream_fast.data.synth import SynthConfig, synthesize, write_amazon2014
from gream_fast.files import MARKER, iter_jsonl, loads

GREAM = Path(sys.executable).with_name("gream-fast")  # the console script, as a user runs it
COMMAND = [str(GREAM)] if GREAM.exists() else [sys.executable, "-m", "gream_fast.cli"]


# -- valid small inputs, one folder per reader ----------------------------------------------------
USERS = [f"{u}" for u in range(1, 7)]
ITEMS = [f"{i}" for i in range(1, 6)]
LOG = [(u, i, 100 * int(u) + 7 * int(i)) for u in USERS for i in ITEMS if (int(u) + int(i)) % 4]


def ml100k(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "u.data").write_text("".join(f"{u}\t{i}\t3\t{t}\n" for u, i, t in LOG))
    (d / "u.genre").write_text("unknown|0\nAction|1\nComedy|2\n")
    (d / "u.item").write_bytes("".join(f"{i}|Film {i} (1995)|01-Jan-1995||http://x|0|1|{int(i) % 2}\n"
                                       for i in ITEMS).encode("latin-1"))
    return d


def ml1m(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "ratings.dat").write_text("".join(f"{u}::{i}::3::{t}\n" for u, i, t in LOG))
    (d / "movies.dat").write_text("".join(f"{i}::Film {i} (1999)::Drama|Romance\n" for i in ITEMS))
    return d


def recbole(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / f"{d.name}.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                       + "".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in LOG))
    (d / f"{d.name}.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\t"
                                      "class:token_seq\tprice:float\n"
                                      + "".join(f"{i}\tFilm {i}\t1999\tDrama Crime\t9.5\n"
                                                for i in ITEMS))
    return d


def amazon2014(d: Path) -> Path:
    write_amazon2014(synthesize(SynthConfig(users=6, items=5, mean_length=5, seed=1)), d)
    return d


def amazon2018(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "Beauty.csv").write_text("".join(f"i{i},u{u},5.0,{t}\n" for u, i, t in LOG))
    (d / "meta_Beauty.json").write_text("".join(json.dumps(
        {"asin": f"i{i}", "title": f"T {i}", "description": ["Line one", "two"],
         "category": ["Beauty", "Skin"], "brand": "B", "price": "$1,299.00"}) + "\n" for i in ITEMS))
    (d / "Beauty_5.json").write_text("".join(json.dumps(
        {"reviewerID": f"u{u}", "asin": f"i{i}", "reviewText": "good", "summary": "ok",
         "unixReviewTime": t}) + "\n" for u, i, t in LOG))
    return d


READERS = {  # name -> (writer, flags)
    "ml-100k": (ml100k, ["--format", "movielens"]),
    "ml-1m": (ml1m, ["--format", "movielens"]),
    "recbole": (recbole, ["--format", "recbole"]),
    "amazon2014": (amazon2014, ["--format", "amazon2014", "--category", "Synthetic"]),
    "amazon2018": (amazon2018, ["--format", "amazon2018", "--category", "Beauty"]),
}


def tree(path: Path) -> dict:
    """Every file under path (or path itself) -> sha256: what 'unchanged' means."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def prepare_cli(capsys, *args) -> tuple:
    """`gream-fast data prepare ARGS` in-process: (exit code, stdout, stderr)."""
    rc = main(["data", "prepare", *map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def refused(capsys, *args, match: str, unchanged=()) -> str:
    """The command exits 2 with one 'gream-fast: error:' line matching `match` and changes none
    of `unchanged` (folders or files)."""
    before = [tree(p) for p in unchanged]
    rc, out, err = prepare_cli(capsys, *args)
    assert rc == 2, (out, err)
    assert err.startswith("gream-fast: error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err
    assert [tree(p) for p in unchanged] == before
    return err


def strict_outputs(out: Path) -> None:
    """Every JSON / JSONL file written parses as strict JSON (no NaN / Infinity), the folder loads
    as a Dataset, and each user's times are finite integers in order."""
    for p in out.rglob("*"):
        if p.suffix == ".jsonl":
            list(iter_jsonl(p))
        elif p.suffix == ".json":
            loads(p.read_bytes().decode("utf-8"), str(p))
    data = Dataset.load(out)
    for s in data.sequences:
        assert len(s["times"]) == len(s["items"]) and s["times"] == sorted(s["times"])
        assert all(type(t) is int or (type(t) is float and abs(t) < 2 ** 63) for t in s["times"])
    assert loads((out / MARKER).read_text(), MARKER)["command"] == "data prepare"


@pytest.mark.parametrize("name", list(READERS))
def test_valid_inputs_prepare(tmp_path, capsys, name):
    make, flags = READERS[name]
    raw = make(tmp_path / name)
    rc, out, err = prepare_cli(capsys, *flags, "--input", raw, "--k-core", 1, "--out", tmp_path / "o")
    assert rc == 0, err
    strict_outputs(tmp_path / "o")


# -- 1. data loss -----------------------------------------------------------------------------------
def test_out_is_the_input_or_a_file_console_script(tmp_path):
    """As typed in a shell: --out naming the input folder, or an existing file, is refused and
    nothing is touched (the two commands run side by side: each starts the whole CLI)."""
    raw = ml100k(tmp_path / "raw" / "ml")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    before = tree(tmp_path)
    base = COMMAND + ["data", "prepare", "--format", "movielens", "--input", "raw/ml"]
    procs = [subprocess.Popen(base + ["--out", out], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for out in ("raw/ml", "notes.txt")]
    (_, err1), (_, err2) = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert "Traceback" not in err1 + err2
    assert "--out raw/ml: it is the input raw/ml" in err1
    assert "--out notes.txt: an existing file" in err2
    assert tree(tmp_path) == before and raw.is_dir() and notes.is_file()


def test_out_holding_the_input_or_a_users_folder_is_refused(tmp_path, capsys):
    raw = ml100k(tmp_path / "raw" / "ml")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    common = ("--format", "movielens", "--input", raw, "--k-core", 1)
    refused(capsys, *common, "--out", tmp_path / "raw", match=r"--out .*raw: it holds the input",
            unchanged=[tmp_path])
    refused(capsys, *common, "--out", mine, match=r"--out .*mine: a folder with files that "
            r"`gream-fast data prepare` did not write", unchanged=[tmp_path])
    refused(capsys, *common, "--out", tmp_path / "mine" / "thesis.tex" / "o",
            match=r"thesis.tex is a file", unchanged=[tmp_path])
    # its own earlier output (the marker) is replaced; an empty folder is fine
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "o", tmp_path / "o", tmp_path / "empty"):
        before = tree(raw)
        assert prepare_cli(capsys, *common, "--out", out)[0] == 0
        assert tree(raw) == before
        strict_outputs(out)


def test_synth_never_replaces_a_users_file_or_folder(tmp_path, capsys):
    """`data synth` writes a dataset folder like `data prepare` (and raw files): same rules."""
    notes, mine = tmp_path / "notes.txt", tmp_path / "mine"
    notes.write_text("my notes\n")
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    before = tree(tmp_path)
    synth = ["data", "synth", "--users", "20", "--items", "10"]
    assert main(synth + ["--out", str(mine)]) == 2
    assert main(synth + ["--as-amazon2014", "--out", str(notes)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "mine: a folder with files" in err
    assert "notes.txt is a file, not a folder" in err
    assert tree(tmp_path) == before


# -- 2. non-finite and out-of-range numbers --------------------------------------------------------
def _set_time(name: str, d: Path, value: str) -> tuple:
    """Put `value` as the time of the 2nd interaction; returns (file, its line number)."""
    f, line, sep, col = {"ml-100k": ("u.data", 2, "\t", 3), "ml-1m": ("ratings.dat", 2, "::", 3),
                         "recbole": ("recbole.inter", 3, "\t", 3),
                         "amazon2014": ("ratings_Synthetic.csv", 2, ",", 3),
                         "amazon2018": ("Beauty.csv", 2, ",", 3)}[name]
    rows = (d / f).read_text().splitlines()
    parts = rows[line - 1].split(sep)
    parts[col] = value
    rows[line - 1] = sep.join(parts)
    (d / f).write_text("\n".join(rows) + "\n")
    return f, line


@pytest.mark.parametrize("value", ["nan", "inf", "-1e300", "1e19"])
@pytest.mark.parametrize("name", list(READERS))
def test_non_finite_or_huge_times(tmp_path, capsys, name, value):
    make, flags = READERS[name]
    raw = make(tmp_path / name)
    f, line = _set_time(name, raw, value)
    args = (*flags, "--input", raw, "--k-core", 1, "--out", tmp_path / "o")
    refused(capsys, *args, match=rf"{f}:{line}: time '{value}' is (not a finite number|out of range)",
            unchanged=[tmp_path])
    assert prepare_cli(capsys, *args, "--skip-bad-lines")[0] == 0
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["bad_lines"] == {str(raw / f): 1}
    strict_outputs(tmp_path / "o")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "1e400", "-1e300", '"soon"', "true",
                                   "[1]", "1" + "0" * 400])
def test_review_times_in_json(tmp_path, capsys, value):
    """Amazon 2018 5-core reviews carry the interactions: their JSON times get the same rule."""
    raw = amazon2018(tmp_path / "raw")
    (raw / "Beauty.csv").unlink()
    rows = (raw / "Beauty_5.json").read_text().splitlines()
    rows[1] = rows[1].replace(f'"unixReviewTime": {LOG[1][2]}', f'"unixReviewTime": {value}')
    (raw / "Beauty_5.json").write_text("\n".join(rows) + "\n")
    refused(capsys, "--format", "amazon2018", "--category", "Beauty", "--input", raw,
            "--out", tmp_path / "o", match=r"Beauty_5.json:2: ", unchanged=[tmp_path])


def test_non_finite_price(tmp_path, capsys):
    raw = amazon2014(tmp_path / "raw")
    meta = raw / "meta_Synthetic.json"
    rows = meta.read_text().splitlines()
    rows[2] = re.sub(r"'price': [0-9.]+", "'price': 1e999", rows[2])  # a literal for inf
    meta.write_text("\n".join(rows) + "\n")
    refused(capsys, "--format", "amazon2014", "--category", "Synthetic", "--input", raw,
            "--out", tmp_path / "o", "--k-core", 1,
            match=r"meta_Synthetic.json:3: price inf is not a finite number")


# -- 3. errors that were tracebacks ----------------------------------------------------------------
@pytest.mark.parametrize("skip", [[], ["--skip-bad-lines"]])
def test_truncated_and_not_gzip_files(tmp_path, capsys, skip):
    raw = amazon2014(tmp_path / "raw")
    meta = raw / "meta_Synthetic.json"
    data = gzip.compress(meta.read_bytes() * 20)
    meta.unlink()
    gz = raw / "meta_Synthetic.json.gz"
    args = ("--format", "amazon2014", "--category", "Synthetic", "--input", raw,
            "--out", tmp_path / "o", *skip)
    gz.write_bytes(data[: len(data) // 2])
    refused(capsys, *args, match=r"meta_Synthetic.json.gz: the gzip data ends early: the file is "
            r"cut short; stopped after line \d+", unchanged=[tmp_path])
    gz.write_bytes(b"plain text, not gzip\n")
    refused(capsys, *args, match=r"meta_Synthetic.json.gz: not a gzip file", unchanged=[tmp_path])
    gz.write_bytes(data[:-8] + b"\0" * 8)  # a damaged trailer (CRC, length)
    refused(capsys, *args, match=r"meta_Synthetic.json.gz: .*gzip", unchanged=[tmp_path])


def test_missing_files_and_bad_input_folder(tmp_path, capsys):
    d = ml100k(tmp_path / "ml")
    (d / "u.item").unlink()
    refused(capsys, "--format", "movielens", "--input", d, "--out", tmp_path / "o",
            match=r"ml: no u.item \(MovieLens-100K needs u.data and u.item")
    d = ml1m(tmp_path / "ml1")
    (d / "movies.dat").unlink()
    refused(capsys, "--format", "movielens", "--input", d, "--out", tmp_path / "o",
            match=r"ml1: no movies.dat \(MovieLens-1M needs ratings.dat and movies.dat")
    refused(capsys, "--format", "movielens", "--input", tmp_path / "nope", "--out", tmp_path / "o",
            match=r"--input .*nope: no such folder")
    refused(capsys, "--format", "movielens", "--input", d / "ratings.dat", "--out",
            tmp_path / "o", match=r"--input .*ratings.dat: a file; expected the folder")
    (d / "movies.dat").mkdir()  # a folder where a file should be
    refused(capsys, "--format", "movielens", "--input", d, "--out", tmp_path / "o",
            match=r"ml1: no movies.dat")
    refused(capsys, "--format", "amazon2014", "--category", "../x", "--input", d,
            "--out", tmp_path / "o", match=r"--category '../x': expected a name")


def test_deeply_nested_json(tmp_path, capsys):
    raw = amazon2018(tmp_path / "raw")
    meta = raw / "meta_Beauty.json"
    rows = meta.read_text().splitlines()
    rows[1] = '{"asin": "i2", "title": ' + "[" * 100_000 + "]" * 100_000 + "}"
    rows[3] = '{"asin": "i4", "title": "x", "description": ' + "[" * 500 + "]" * 500 + "}"
    meta.write_text("\n".join(rows) + "\n")
    args = ("--format", "amazon2018", "--category", "Beauty", "--input", raw, "--k-core", 1,
            "--out", tmp_path / "o")
    refused(capsys, *args, match=r"meta_Beauty.json:2: JSON nested too deeply", unchanged=[tmp_path])
    rc, out, _ = prepare_cli(capsys, *args, "--skip-bad-lines")
    assert rc == 0 and "2 bad lines skipped" in out
    strict_outputs(tmp_path / "o")


@pytest.mark.parametrize("name", list(READERS))
def test_binary_data_file(tmp_path, capsys, name):
    make, flags = READERS[name]
    raw = make(tmp_path / name)
    target = max(raw.iterdir(), key=lambda p: p.stat().st_size)  # the biggest data file
    target.write_bytes(bytes(range(256)) * 40)
    refused(capsys, *flags, "--input", raw, "--k-core", 1, "--out", tmp_path / "o",
            match=rf"{target.name}:1: binary data \(a NUL byte\)", unchanged=[tmp_path])


def test_invalid_utf8_is_replaced_and_counted(tmp_path, capsys):
    raw = amazon2018(tmp_path / "raw")
    meta = raw / "meta_Beauty.json"
    rows = meta.read_bytes().split(b"\n")
    rows[0] = rows[0].replace(b'"T 1"', b'"caf\xe9 \xff"')
    rows[2] = rows[2].replace(b'"B"', b'"\xc3"')
    meta.write_bytes(b"\n".join(rows))
    rc, out, _ = prepare_cli(capsys, "--format", "amazon2018", "--category", "Beauty", "--input",
                             raw, "--k-core", 1, "--out", tmp_path / "o")
    assert rc == 0
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["invalid_utf8_lines"] == {str(meta): 2}
    items = Dataset.load(tmp_path / "o").items
    assert items[0]["title"] == "caf\ufffd \ufffd." and items[2]["brand"] == "\ufffd"
    # a lone surrogate escaped in JSON cannot be written as UTF-8: a bad line
    rows[0] = b'{"asin": "i1", "title": "\\ud800"}'
    meta.write_bytes(b"\n".join(rows))
    refused(capsys, "--format", "amazon2018", "--category", "Beauty", "--input", raw,
            "--out", tmp_path / "o2", match=r"meta_Beauty.json:1: field 'title': not valid Unicode")


# -- 4. silent acceptance ----------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--max-history", -5), ("--max-history", 0),
                                         ("--k-core", 0), ("--k-core", -3)])
def test_flags_out_of_range(tmp_path, capsys, flag, value):
    raw = ml100k(tmp_path / "ml")
    refused(capsys, "--format", "movielens", "--input", raw, flag, value, "--out", tmp_path / "o",
            match=rf"{flag}: expected >= 1, got {value}", unchanged=[tmp_path])
    assert not (tmp_path / "o").exists()


def test_missing_category_and_input(tmp_path, capsys):
    refused(capsys, "--format", "amazon2018", "--input", tmp_path, "--out", tmp_path / "o",
            match=r"--category is required for amazon2018")
    refused(capsys, "--format", "movielens", "--out", tmp_path / "o",
            match=r"--input is required for format movielens")


@pytest.mark.parametrize("name", list(READERS))
def test_duplicate_item_records_keep_the_first(tmp_path, capsys, name):
    make, flags = READERS[name]
    raw = make(tmp_path / name)
    f = {"ml-100k": "u.item", "ml-1m": "movies.dat", "recbole": "recbole.item",
         "amazon2014": "meta_Synthetic.json", "amazon2018": "meta_Beauty.json"}[name]
    rows = (raw / f).read_text(encoding="latin-1").splitlines()
    dup = rows[-1].replace("Film", "Other").replace("'title': '", "'title': 'Other ")
    dup = dup.replace('"title": "', '"title": "Other ')
    (raw / f).write_text("\n".join(rows + [dup]) + "\n", encoding="latin-1")
    rc, _, err = prepare_cli(capsys, *flags, "--input", raw, "--k-core", 1, "--out", tmp_path / "o")
    assert rc == 0, err
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["duplicate_items"] == {str(raw / f): 1}
    assert not any("Other" in r["title"] for r in Dataset.load(tmp_path / "o").items)


@pytest.mark.parametrize("line, match", [
    ('{"user": "1", "user_id": 0, "items": [0], "times": [NaN]}', r"sequences.jsonl:1: not valid JSON"),
    (b'{"user": "\xff", "user_id": 0, "items": [0]}', r"sequences.jsonl:1: not UTF-8"),
    ('{"user_id": 0, "items": ' + "[" * 5000 + "]" * 5000 + "}", r"sequences.jsonl:1: JSON nested"),
    ('{"user_id": 0, "items": [true]}', r"sequences.jsonl:1: item id True is not in items.jsonl"),
])
def test_corrupted_dataset_folder(tmp_path, line, match):
    out = tmp_path / "o"
    run(PrepareConfig(format="movielens", input=str(ml100k(tmp_path / "ml")), k_core=1, out=str(out)))
    (out / "sequences.jsonl").write_bytes(line if isinstance(line, bytes) else line.encode())
    with pytest.raises(GreamError, match=match):
        Dataset.load(out)


def test_corrupted_stats_json(tmp_path):
    out = tmp_path / "o"
    run(PrepareConfig(format="movielens", input=str(ml100k(tmp_path / "ml")), k_core=1, out=str(out)))
    stats = out / "stats.json"
    for text, match in [('{"max_history": -5}', r"stats.json: field 'max_history': expected an "
                         r"integer >= 1, got -5"),
                        ('{"sparsity": NaN}', r"stats.json: not valid JSON"),
                        ("[1]", r"stats.json: expected a JSON object")]:
        stats.write_text(text)
        with pytest.raises(GreamError, match=match):
            Dataset.load(out)
    stats.write_text("{}")
    with pytest.raises(GreamError, match=r"max_history: expected an integer >= 1, got 0"):
        Dataset.load(out).split(max_history=0)


# -- 5. interruption ---------------------------------------------------------------------------------
def test_stale_temp_of_a_dead_run_is_removed_live_one_kept(tmp_path, capsys):
    raw = ml100k(tmp_path / "ml")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".o.{dead.pid}.abcd.tmp"
        running = tmp_path / f".o.{live.pid}.efgh.tmp"
        for t in (stale, running):
            t.mkdir()
            (t / "sequences.jsonl").write_text("half")
        rc, _, err = prepare_cli(capsys, "--format", "movielens", "--input", raw, "--k-core", 1,
                                 "--out", tmp_path / "o")
        assert rc == 0, err
        assert not stale.exists() and running.is_dir()
    finally:
        live.kill()
        live.wait()


# -- fuzz: every reader, mutated files ------------------------------------------------------------
TOKENS = ["nan", "NaN", "inf", "-Infinity", "1e999", "-1e300", "9" * 30, "", "null", "true",
          "[]", "{}", '"x"', "'x'", "::", "|", "\t", ",", "\x00", "\udcff", "\\ud800", "é"]


@st.composite
def mutation(draw, names):
    """(file name, function bytes -> bytes): truncation, byte flips, inserted tokens (wrong types,
    non-finite and huge numbers, separators), a deleted column, a repeated line."""
    name = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete_column", "repeat_line",
                                 "replace_field"]))
    frac = draw(st.floats(0, 1))
    token = draw(st.sampled_from(TOKENS)).encode("utf-8", "surrogateescape")
    byte = draw(st.integers(0, 255))
    column = draw(st.integers(0, 5))

    def apply(data: bytes) -> bytes:
        at = int(frac * len(data))
        if kind == "truncate":
            return data[:at]
        if kind == "flip":
            return data[:at] + bytes([byte]) + data[at + 1:]
        if kind == "insert":
            return data[:at] + token + data[at:]
        rows = data.split(b"\n")
        r = min(int(frac * len(rows)), len(rows) - 1)
        seps = [s for s in (b"::", b"\t", b"|", b",", b", ") if s in rows[r]]
        if kind == "repeat_line":
            rows.insert(r, rows[r])
        elif seps:
            parts = rows[r].split(seps[0])
            c = column % len(parts)
            if kind == "delete_column":
                del parts[c]
            else:
                parts[c] = token
            rows[r] = seps[0].join(parts)
        return b"\n".join(rows)

    return name, kind, apply


def _fuzz(base: Path, reader: str, gz: bool):
    make, flags = READERS[reader]
    raw = make(base / "raw")
    if gz:  # the metadata gzipped: a mutation may cut or damage the gzip stream itself
        meta = next(raw.glob("meta_*.json"))
        meta.with_suffix(".json.gz").write_bytes(gzip.compress(meta.read_bytes()))
        meta.unlink()
    originals = {p.name: p.read_bytes() for p in raw.iterdir()}
    fmt, category = flags[1], (flags[3] if len(flags) > 2 else None)

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(mutation(sorted(originals)), st.booleans())
    def check(m, skip):
        name, _, apply = m
        for n, data in originals.items():
            (raw / n).write_bytes(data)
        data = originals[name]
        if name.endswith(".gz") and m[1] not in ("truncate", "flip"):
            data = gzip.compress(apply(gzip.decompress(data)))  # edit the text inside
        else:
            data = apply(data)
        (raw / name).write_bytes(data)
        out = base / "out"
        try:
            run(PrepareConfig(format=fmt, input=str(raw), category=category, k_core=1,
                              skip_bad_lines=skip, out=str(out)))
        except GreamError as e:
            assert str(e)  # a message, never an empty one
            return
        strict_outputs(out)

    check()


@pytest.mark.parametrize("reader, gz", [(r, False) for r in READERS] + [("amazon2014", True)])
def test_fuzz_readers(tmp_path, reader, gz):
    _fuzz(tmp_path, reader, gz)
