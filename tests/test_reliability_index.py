"""Every bad index a user can hand us is refused with a message naming the file and the item,
token or field, through the loaders and through `gream-fast index stats/convert`; every index that
is accepted round-trips. Ends with property tests over random mutations of valid files."""
import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from gream_fast import FormatError, GreamError, InvalidInputError
from gream_fast.cli import main
from gream_fast.index import MAX_CODEBOOK_SIZE, SemanticIndex, load_index
from gream_fast.tasks import context

META = {"format": "gream-fast.semantic-index", "version": "1", "codebook_size": "8"}


def sid3(i, extra=()):
    """A 3-token SID unique to item i (a_{i+1}), with optional extra tokens."""
    return [f"<|a_{i + 1}|>", "<|b_1|>", "<|c_2|>", *extra]


def ten(**changes):
    """Ten items with 3-token SIDs; `changes` (item id -> tokens) replace some."""
    data = {str(i): sid3(i) for i in range(10)}
    data.update({k.lstrip("_"): v for k, v in changes.items()})
    return data


def small_index(seed=0, n=30, levels=2, k=4):
    """n items with codes in 0..k-1 (so some collide), codebook size max(k, n): room for every
    collision rank."""
    return SemanticIndex.from_codes(np.random.default_rng(seed).integers(0, k, (n, levels)), max(k, n))


def check_cli(args, capsys, match):
    """The CLI as the user types it: exit code 2, one error line that matches, no traceback."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("gream-fast: error: ")
    assert match.search(err), err


# (id, file content: a JSON value or raw bytes, codebook_size, message regex after the file name)
BAD_JSON = [
    ("huge code, K inferred", ten(_3=["<|a_999999999|>", "<|b_1|>", "<|c_2|>"]), None,
     r'item "3", token 0: "<\|a_999999999\|>": expected .* N in 1\.\.65536'),
    ("code above given K", ten(_2=["<|a_3|>", "<|b_9|>", "<|c_2|>"]), 8,
     r'item "2", token 1: "<\|b_9\|>": expected .* N in 1\.\.8, the codebook_size given'),
    ("code 0", ten(_1=["<|a_2|>", "<|b_0|>", "<|c_2|>"]), None, r'item "1", token 1: "<\|b_0\|>"'),
    ("negative code", ten(_1=["<|a_-2|>", "<|b_1|>", "<|c_2|>"]), None,
     r'item "1", token 0: "<\|a_-2\|>" is not \'<\|a_N\|>\''),
    ("leading zero", ten(_1=["<|a_02|>", "<|b_1|>", "<|c_2|>"]), None, r'item "1", token 0: "<\|a_02\|>"'),
    ("non-ASCII digits", ten(_1=["<|a_\u0663|>", "<|b_1|>", "<|c_2|>"]), None, r'item "1", token 0'),
    ("unknown letter", ten(_5=["<|a_6|>", "<|x_1|>", "<|c_2|>"]), None,
     r'item "5", token 1: "<\|x_1\|>" is not \'<\|b_N\|>\''),
    ("levels out of order", ten(_5=["<|b_1|>", "<|a_6|>", "<|c_2|>"]), None,
     r'item "5", token 0: "<\|b_1\|>" is not \'<\|a_N\|>\''),
    ("non-string token", ten(_4=["<|a_5|>", 7, "<|c_2|>"]), None, r'item "4", token 1: 7 is not'),
    ("null token", ten(_4=["<|a_5|>", None, "<|c_2|>"]), None, r'item "4", token 1: null is not'),
    ("tokens not a list", ten(_6="<|a_7|><|b_1|>"), None, r'item "6": expected a list of 1 to 25'),
    ("empty SID", ten(_6=[]), None, r'item "6": expected a list of 1 to 25 tokens, got \[\]'),
    ("non-integer id", {"0": sid3(0), "x": sid3(1)}, None, r"item id 'x': expected ids 0\.\.1"),
    ("negative id", {"0": sid3(0), "-1": sid3(1)}, None, r"item id '-1': expected ids 0\.\.1"),
    ("id with a leading zero", {"0": sid3(0), "01": sid3(1)}, None, r"item id '01'"),
    ("missing id", {"0": sid3(0), "1": sid3(1), "3": sid3(3)}, None,
     r"item id '3': expected ids 0\.\.2, one per item \(item \"2\" is missing\)"),
    ("duplicate id", b'{"0": ["<|a_1|>"], "1": ["<|a_2|>"], "1": ["<|a_3|>"]}', None,
     r"item id '1' appears 2 times"),
    ("short SID", ten(_7=["<|a_8|>", "<|b_1|>"]), None, r'item "7" has 2 tokens; expected 3'),
    ("short SID among collisions",
     {**ten(_7=["<|a_8|>", "<|b_1|>"]), "10": sid3(0, ["<|d_2|>"]), "0": sid3(0, ["<|d_1|>"])},
     None, r'item "7" has 2 tokens; expected 3'),
    ("long SID", ten(_2=sid3(2, ["<|d_1|>", "<|e_1|>"])), None, r'item "2" has 5 tokens; expected 3'),
    ("same SID twice", ten(_1=sid3(0)), None, r"items 0 and 1 have the same SID"),
    ("collision level on unshared codes", ten(_4=sid3(4, ["<|d_1|>"])), None,
     r"item 4 has a collision level but no other item shares its codes"),
    ("SID a prefix of another", {**ten(_1=sid3(0, ["<|d_1|>"])), "10": sid3(0, ["<|d_2|>"])}, None,
     r"items 0 and 1 share the codes .* item 0 has no collision level"),
    ("a list, not an object", [sid3(0)], None, r"expected a non-empty object"),
    ("empty object", {}, None, r"expected a non-empty object"),
    ("NaN", b'{"0": NaN}', None, r"not valid JSON \(NaN is not JSON\)"),
    ("Infinity", b'{"0": ["<|a_1|>"], "1": -Infinity}', None, r"not valid JSON"),
    ("truncated", b'{"0": ["<|a_1|>"], "1": ["<|a_', None, r"not valid JSON"),
    ("nested too deeply", b'{"0": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, r"JSON nested too deeply"),
    ("not UTF-8", b'{"0": ["<|a_1|>\xff"]}', None, r"not UTF-8 text \(byte 15\)"),
]


def write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


@pytest.mark.parametrize("content, k, message", [c[1:] for c in BAD_JSON], ids=[c[0] for c in BAD_JSON])
def test_bad_index_json_is_refused_everywhere(tmp_path, capsys, content, k, message):
    path = write(tmp_path / "items.index.json", content)
    want = re.compile(re.escape(str(path)) + ": " + message)
    for load in (lambda: SemanticIndex.from_index_json(path, k), lambda: load_index(path, k),
                 lambda: load_index(tmp_path, k)):
        with pytest.raises(FormatError, match=want):
            load()
    flag = [] if k is None else ["--codebook-size", str(k)]
    check_cli(["index", "stats", str(path), *flag], capsys, want)
    dst = tmp_path / "out.safetensors"
    check_cli(["index", "convert", str(path), str(dst), *flag], capsys, want)
    assert not dst.exists()


@pytest.mark.parametrize("k", [0, -1, MAX_CODEBOOK_SIZE + 1, 2.5, True, "8"])
def test_bad_codebook_size_argument(tmp_path, k):
    path = write(tmp_path / "x.index.json", ten())
    with pytest.raises(InvalidInputError, match=f"codebook_size {k!r}: expected an integer in 1..65536"):
        SemanticIndex.from_index_json(path, k)
    with pytest.raises(InvalidInputError, match="codebook_size"):
        SemanticIndex.from_codes(np.zeros((2, 1), dtype=int) + [[0], [1]], k)


def test_largest_allowed_code_is_read(tmp_path):
    path = write(tmp_path / "x.index.json", ten(_0=[f"<|a_{MAX_CODEBOOK_SIZE}|>", "<|b_1|>", "<|c_2|>"]))
    assert SemanticIndex.from_index_json(path).codebook_size == MAX_CODEBOOK_SIZE


def test_collision_levels_and_all_collided_files_are_read(tmp_path):
    index = small_index(n=60, k=3)  # 9 tuples for 60 items: every item collides
    assert index.num_collisions == 60
    index.to_index_json(tmp_path / "x.index.json")
    again = SemanticIndex.from_index_json(tmp_path / "x.index.json", index.codebook_size)
    assert [again.sid(i) for i in range(60)] == [index.sid(i) for i in range(60)]
    assert again.fingerprint() == index.fingerprint()
    index = small_index(n=12, k=6)
    assert 0 < index.num_collisions < 12
    index.to_index_json(tmp_path / "y.index.json")
    assert SemanticIndex.from_index_json(tmp_path / "y.index.json", 12) == index


def arrays_of(index):
    return {"codes": index.codes, "extra": index.extra}


def valid_safetensors(path, index=None):
    (index or small_index()).save(path)
    return path


BAD_SAFETENSORS = [
    ("truncated", lambda p: p.write_bytes(valid_safetensors(p).read_bytes()[:60]),
     "not a readable safetensors file"),
    ("header byte flipped", lambda p: p.write_bytes(b"\xff" + valid_safetensors(p).read_bytes()[1:]),
     "not a readable safetensors file"),
    ("not safetensors", lambda p: p.write_text("item,sid\n0,a\n"), "not a readable safetensors file"),
    ("float codes", lambda p: save_file({"codes": np.zeros((3, 2), np.float32), "extra": np.full(3, -1)},
                                        p, META), "codes: expected integers, got dtype float32"),
    ("bool codes", lambda p: save_file({"codes": np.eye(3, dtype=bool), "extra": np.full(3, -1)},
                                       p, META), "codes: expected integers, got dtype bool"),
    ("3-D codes", lambda p: save_file({"codes": np.zeros((3, 2, 1), np.int64), "extra": np.full(3, -1)},
                                      p, META), "codes: expected a 2-D array"),
    ("no levels", lambda p: save_file({"codes": np.zeros((3, 0), np.int64), "extra": np.full(3, -1)},
                                      p, META), r"codes: expected \[items, levels\] with both > 0"),
    ("extra of wrong length", lambda p: save_file({"codes": np.arange(3)[:, None], "extra": np.full(2, -1)},
                                                  p, META), r"extra: expected shape \[3\], got \[2\]"),
    ("negative code", lambda p: save_file({"codes": np.array([[0], [-4]]), "extra": np.full(2, -1)},
                                          p, META), r"codes\[1, 0\] = -4: expected 0\.\.7"),
    ("code out of range", lambda p: save_file({"codes": np.array([[0], [900]]), "extra": np.full(2, -1)},
                                              p, META), r"codes\[1, 0\] = 900: expected 0\.\.7"),
    ("uint64 beyond int64", lambda p: save_file({"codes": np.array([[0], [2**63]], np.uint64),
                                                 "extra": np.full(2, -1)}, p, META), r"codes: value 9223372036854775808 does not fit in int64"),
    ("collision code out of range", lambda p: save_file({"codes": np.array([[0], [0]]),
                                                         "extra": np.array([0, 8])}, p, META),
     r"extra\[1\] = 8: expected -1 or 0\.\.7"),
    ("same SID twice", lambda p: save_file({"codes": np.array([[1], [1]]), "extra": np.full(2, -1)},
                                           p, META), "items 0 and 1 have the same SID"),
    ("lonely collision level", lambda p: save_file({"codes": np.array([[1], [2]]), "extra": np.array([-1, 0])},
                                                   p, META), "item 1 has a collision level but no other"),
    ("codebook_size missing", lambda p: save_file(arrays_of(small_index()), p,
                                                  {k: v for k, v in META.items() if k != "codebook_size"}),
     "metadata 'codebook_size' is missing; expected an integer in 1..65536"),
    ("codebook_size not a number", lambda p: save_file(arrays_of(small_index()), p,
                                                       META | {"codebook_size": "4.0"}),
     "metadata 'codebook_size' is \"4.0\""),
    ("codebook_size absurd", lambda p: save_file(arrays_of(small_index()), p,
                                                 META | {"codebook_size": "9" * 5000}),
     r"metadata 'codebook_size' is \"9{30}"),
    ("codebook_size too large", lambda p: save_file(arrays_of(small_index()), p,
                                                    META | {"codebook_size": "1000000"}),
     "codebook_size 1000000: expected an integer in 1..65536"),
    ("codebook_size 0", lambda p: save_file(arrays_of(small_index()), p, META | {"codebook_size": "0"}),
     "codebook_size 0: expected an integer"),
    ("another file kind", lambda p: save_file(arrays_of(small_index()), p, META | {"format": "x"}),
     "metadata 'format' is 'x'"),
    ("tensor missing", lambda p: save_file({"codes": small_index().codes}, p, META),
     r"missing tensor\(s\) \['extra'\]"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in BAD_SAFETENSORS], ids=[c[0] for c in BAD_SAFETENSORS])
def test_bad_safetensors_is_refused_everywhere(tmp_path, capsys, make, message):
    path = tmp_path / "index.safetensors"
    make(path)
    want = re.compile(re.escape(str(path)) + ": " + message)
    for load in (lambda: SemanticIndex.load(path), lambda: load_index(path), lambda: load_index(tmp_path)):
        with pytest.raises(FormatError, match=want):
            load()
    check_cli(["index", "stats", str(path)], capsys, want)
    check_cli(["index", "convert", str(path), str(tmp_path / "out.index.json")], capsys, want)
    assert not (tmp_path / "out.index.json").exists()


def test_load_index_paths(tmp_path):
    assert context.load_index is load_index  # the task builders' old import still works
    index = small_index()  # K = 30
    with pytest.raises(FormatError, match="nope: no such file or folder; expected an index folder"):
        load_index(tmp_path / "nope")
    with pytest.raises(FormatError, match="no index.safetensors and no \\*.index.json files"):
        load_index(tmp_path)
    index.to_index_json(tmp_path / "a.index.json")
    assert load_index(tmp_path, 30) == index  # the one .index.json of a folder, with its K
    index.to_index_json(tmp_path / "b.index.json")
    with pytest.raises(FormatError, match=r"2 \*.index.json files \(a.index.json, b.index.json\)"):
        load_index(tmp_path)
    index.save(tmp_path / "index.safetensors")  # preferred: it records K
    assert load_index(tmp_path) == index == load_index(tmp_path / "index.safetensors", 30)
    with pytest.raises(InvalidInputError, match="codebook_size 8 given, but this index records 30"):
        load_index(tmp_path, 8)
    (tmp_path / "items.jsonl").write_text('{"item": 0}\n')
    with pytest.raises(FormatError, match="items.jsonl: not a readable safetensors file .*; expected "
                                          "an index folder, an X.index.json or an index .safetensors"):
        load_index(tmp_path / "items.jsonl")
    index.save(tmp_path / "renamed.idx")  # `index convert x.json y.idx` writes safetensors
    assert load_index(tmp_path / "renamed.idx") == index


def test_cli_reads_index_folders(tmp_path, capsys):
    check_cli(["index", "stats", str(tmp_path)], capsys, re.compile("no index.safetensors and no"))
    small_index().to_index_json(tmp_path / "items.index.json")
    assert main(["index", "stats", str(tmp_path), "--codebook-size", "30"]) == 0
    assert json.loads(capsys.readouterr().out)["codebook_size"] == 30


def test_cli_reads_what_it_wrote(tmp_path, capsys):
    index = small_index()
    index.to_index_json(tmp_path / "x.index.json")
    assert main(["index", "convert", str(tmp_path / "x.index.json"), str(tmp_path / "x.safetensors"),
                 "--codebook-size", "30"]) == 0
    assert SemanticIndex.load(tmp_path / "x.safetensors") == index
    assert main(["index", "stats", str(tmp_path / "x.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["codebook_size"] == 30


# -- fingerprint ---------------------------------------------------------------------------------
def test_fingerprint(tmp_path):
    index = small_index(n=40, k=4)
    k = index.codebook_size
    fp = index.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    index.save(tmp_path / "i.safetensors")
    index.to_index_json(tmp_path / "i.index.json")
    assert SemanticIndex.load(tmp_path / "i.safetensors").fingerprint() == fp
    assert SemanticIndex.from_index_json(tmp_path / "i.index.json", k).fingerprint() == fp
    assert load_index(tmp_path / "i.index.json", k).fingerprint() == fp
    # another mapping: two items swapped, a subset, another codebook size
    sids = index.sid_codes()
    i, j = 0, next(j for j in range(1, 40) if not np.array_equal(sids[j], sids[0]))
    perm = np.arange(40)
    perm[[i, j]] = perm[[j, i]]
    swapped = SemanticIndex(index.codes[perm], index.extra[perm], k)
    subset = SemanticIndex.from_codes(index.codes[:-1], k)
    wider = SemanticIndex(index.codes, index.extra, k + 1)
    assert len({fp, swapped.fingerprint(), subset.fingerprint(), wider.fingerprint()}) == 4


def test_fingerprint_is_stable_across_versions():
    # a recorded value: a change here orphans every model folder that recorded a fingerprint
    index = SemanticIndex.from_codes(np.array([[0, 1], [1, 0], [1, 0]]), 2)
    assert index.fingerprint() == "7c859fda895aafc0"


# -- property tests: random mutations of valid files ----------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
    | st.sampled_from(["<|a_1|>", "<|b_2|>", "<|c_1|>", "<|a_0|>", "<|a_99999999|>", "<|e_1|>"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)


@st.composite
def mutated_index_json(draw):
    """(bytes of an .index.json, codebook_size passed) from a valid file with a few mutations."""
    index = small_index(seed=draw(st.integers(0, 3)), n=draw(st.integers(1, 12)),
                        levels=draw(st.integers(1, 3)), k=draw(st.sampled_from([2, 4])))
    data = {str(i): index.sid(i) for i in range(index.num_items)}
    keys = list(data)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(keys))
        op = draw(st.sampled_from(["value", "token", "drop token", "add token", "code", "delete",
                                   "new key", "swap"]))
        toks = data.get(key)
        if op == "value":
            data[key] = draw(json_values)
        elif op == "delete":
            data.pop(key, None)
        elif op == "new key":
            data[draw(st.text(max_size=4) | st.integers(-2, 20).map(str))] = draw(json_values)
        elif op == "swap":
            other = draw(st.sampled_from(keys))
            data[key], data[other] = data.get(other), data.get(key)
        elif isinstance(toks, list) and toks:
            j = draw(st.integers(0, len(toks) - 1))
            if op == "token":
                toks[j] = draw(json_values)
            elif op == "drop token":
                toks.pop(j)
            elif op == "add token":
                toks.insert(j, draw(json_values))
            else:
                toks[j] = f"<|{'abcdz'[min(j, 4)]}_{draw(st.integers(-3, 2**40))}|>"
    text = json.dumps(data, allow_nan=True).encode()  # NaN and Infinity slip in from floats()
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):  # then a few bytes
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["truncate", "flip", "insert"]))
        if op == "truncate":
            text = text[:at]
        elif op == "flip" and at < len(text):
            text = text[:at] + bytes([draw(st.integers(0, 255))]) + text[at + 1:]
        elif op == "insert":
            text = text[:at] + draw(st.binary(max_size=4)) + text[at:]
    return text, draw(st.none() | st.sampled_from([2, 4, 8]))


def assert_round_trips(index, tmp_path):
    """A valid index survives both formats whole, fingerprint included."""
    index.save(tmp_path / "rt.safetensors")
    index.to_index_json(tmp_path / "rt.index.json")
    for again in (SemanticIndex.load(tmp_path / "rt.safetensors"),
                  SemanticIndex.from_index_json(tmp_path / "rt.index.json", index.codebook_size)):
        assert [again.sid(i) for i in range(len(again))] == [index.sid(i) for i in range(len(index))]
        assert again.fingerprint() == index.fingerprint()


FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(mutated_index_json())
def test_index_json_mutations(tmp_path, case):
    text, k = case
    path = write(tmp_path / "m.index.json", text)
    try:
        index = SemanticIndex.from_index_json(path, k)
    except GreamError as e:
        assert str(path) in str(e)
        return
    data = json.loads(text.decode("utf-8-sig"))
    assert len(index) == len(data)
    assert all(index.sid(int(key)) == toks for key, toks in data.items())  # each SID as written
    assert_round_trips(index, tmp_path)


int_dtypes = st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint64, np.float32,
                              np.float64, np.bool_])


@st.composite
def mutated_safetensors(draw):
    """Bytes of an index .safetensors: a valid one, re-saved with altered arrays or metadata,
    and/or with bytes truncated or flipped."""
    index = small_index(seed=draw(st.integers(0, 3)), n=draw(st.integers(1, 12)),
                        levels=draw(st.integers(1, 3)), k=4)
    arrays, meta = arrays_of(index), dict(META, codebook_size=str(index.codebook_size))
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(["codes", "extra"]))
        op = draw(st.sampled_from(["dtype", "value", "shape", "delete", "meta"]))
        if op == "dtype" and name in arrays:
            arrays[name] = arrays[name].astype(draw(int_dtypes))
        elif op == "value" and name in arrays and arrays[name].size:
            a = arrays[name].astype(np.int64)
            a.flat[draw(st.integers(0, a.size - 1))] = draw(st.integers(-2**63, 2**63 - 1))
            arrays[name] = a
        elif op == "shape" and name in arrays:
            arrays[name] = arrays[name].reshape(draw(st.sampled_from([(-1,), (-1, 1), (1, -1), (-1, 1, 1)])))
        elif op == "delete":
            arrays.pop(name, None)
        elif op == "meta":
            key = draw(st.sampled_from(["codebook_size", "format", "version"]))
            value = draw(st.none() | st.text(max_size=6) | st.integers(-5, 10**12).map(str))
            meta.pop(key, None) if value is None else meta.__setitem__(key, value)
    from safetensors.numpy import save
    blob = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=meta)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # most files stay readable
        at = draw(st.integers(0, len(blob)))
        blob = blob[:at] if draw(st.booleans()) else (
            blob[:at] + bytes([draw(st.integers(0, 255))]) + blob[at + 1:])
    return blob


@FUZZ
@given(mutated_safetensors())
def test_safetensors_mutations(tmp_path, blob):
    path = write(tmp_path / "m.safetensors", blob)
    try:
        index = SemanticIndex.load(path)
    except GreamError as e:
        assert str(path) in str(e)
        return
    assert_round_trips(index, tmp_path)
