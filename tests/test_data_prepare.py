"""data prepare against a plain-Python model of METHOD.md section 1, on every input format."""
import gzip
import json
import random

import pytest

from gream_fast import GreamError
from gream_fast.data import Dataset, PrepareConfig, run
from gream_fast.data.readers import read, recbole_ml100k
from gream_fast.data.text import clean_text


def model(users, items, times, has_meta, k):
    """The rules written the obvious way: returns {raw user: [raw items in time order]}."""
    rows = sorted(range(len(users)), key=lambda e: (users[e], times[e], e))
    seen, seqs = set(), {}
    for e in rows:
        if (users[e], items[e]) in seen:
            continue
        seen.add((users[e], items[e]))
        if has_meta(items[e]):
            seqs.setdefault(users[e], []).append(items[e])
    while True:
        icount = {}
        for s in seqs.values():
            for i in s:
                icount[i] = icount.get(i, 0) + 1
        new = {u: [i for i in s if icount[i] >= k] for u, s in seqs.items() if len(s) >= k}
        new = {u: s for u, s in new.items() if s}
        if new == seqs:
            return seqs
        seqs = new


def check_against_model(out_dir, seqs):
    data = Dataset.load(out_dir)
    users = sorted(seqs)
    assert [s["user"] for s in data.sequences] == users
    item_raw = sorted({i for s in seqs.values() for i in s})
    assert [r["raw_id"] for r in data.items] == item_raw
    for s in data.sequences:
        assert [item_raw[i] for i in s["items"]] == seqs[s["user"]]
        assert s["times"] == sorted(s["times"])
    stats = json.loads((out_dir / "stats.json").read_text())
    assert stats["num_users"] == len(users) and stats["num_items"] == len(item_raw)
    assert stats["num_interactions"] == sum(map(len, seqs.values()))
    return data


def random_log(rng, n_users=60, n_items=40, n=1500):
    users = [f"u{rng.randrange(n_users)}" for _ in range(n)]
    items = [f"i{rng.randrange(n_items):03d}" for _ in range(n)]
    times = [rng.randrange(50) for _ in range(n)]  # few distinct times: many ties
    return users, items, times


def write_amazon2014(d, users, items, times, meta_items, category="Musical_Instruments",
                     gz=False):
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"ratings_{category}.csv", "w") as f:
        for u, i, t in zip(users, items, times):
            f.write(f"{u},{i},4.0,{t}\n")
    lines = []
    for i in meta_items:
        rec = {"asin": i, "title": f"Item &amp; <b>{i}</b>", "description": 'A "good" thing.\nYes..',
               "categories": [["Musical Instruments", "Guitars"], ["Musical Instruments", "Picks"]],
               "brand": "Acme", "price": 9.5, "related": {"also_bought": ["x", "y"]}}
        lines.append(repr(rec))
    path = d / (f"meta_{category}.json" + (".gz" if gz else ""))
    opener = gzip.open if gz else open
    with opener(path, "wt") as f:
        f.write("\n".join(lines) + "\n")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_amazon2014_matches_model(tmp_path, seed):
    rng = random.Random(seed)
    users, items, times = random_log(rng)
    meta_items = sorted({i for i in items if rng.random() < 0.85})  # some items lack metadata
    write_amazon2014(tmp_path / "raw", users, items, times, meta_items, gz=seed == 1)
    out = tmp_path / "out"
    run(PrepareConfig(format="amazon2014", input=str(tmp_path / "raw"), category="Instruments",
                      k_core=3, out=str(out)))
    seqs = model(users, items, times, set(meta_items).__contains__, 3)
    data = check_against_model(out, seqs)
    rec = data.items[0]
    assert rec["title"] == f"Item & {rec['raw_id']}." and rec["brand"] == "Acme"
    assert rec["description"] == "A good thing. Yes." and rec["price"] == 9.5
    assert rec["categories"] == ["Musical Instruments", "Guitars", "Picks"]


def test_ties_keep_file_order_and_earliest_duplicate(tmp_path):
    # user a: i2 and i1 at the same time (file order i2, i1); i1 again later (dropped)
    users = ["a"] * 4 + ["b"] * 3
    items = ["i2", "i1", "i3", "i1", "i1", "i2", "i3"]
    times = [5, 5, 7, 9, 1, 2, 3]
    write_amazon2014(tmp_path / "raw", users, items, times, ["i1", "i2", "i3"])
    run(PrepareConfig(format="amazon2014", input=str(tmp_path / "raw"), category="Instruments",
                      k_core=1, out=str(tmp_path / "out")))
    data = Dataset.load(tmp_path / "out")
    assert data.sequences[0]["items"] == [1, 0, 2]  # i2, i1, i3
    assert data.sequences[0]["times"] == [5, 5, 7]
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["dropped"]["repeated_pairs"] == 1


def test_amazon2018_json_lines_and_reviews(tmp_path):
    rng = random.Random(5)
    users, items, times = random_log(rng, n=800)
    d = tmp_path / "raw"
    d.mkdir()
    with open(d / "Musical_Instruments.csv", "w") as f:  # item,user,rating,time
        for u, i, t in zip(users, items, times):
            f.write(f"{i},{u},5.0,{t}\n")
    with gzip.open(d / "meta_Musical_Instruments.json.gz", "wt") as f:
        for i in sorted(set(items)):
            f.write(json.dumps({"asin": i, "title": f"T {i}", "description": ["Line one", "two"],
                                "category": ["Instruments", "Amps"], "brand": "B",
                                "price": "$1,299.00"}) + "\n")
    with open(d / "Musical_Instruments_5.json", "w") as f:
        for u, i, t in zip(users, items, times):
            f.write(json.dumps({"reviewerID": u, "asin": i, "reviewText": f"{u} on {i}",
                                "summary": "ok", "unixReviewTime": t}) + "\n")
    out = tmp_path / "out"
    run(PrepareConfig(format="amazon2018", input=str(d), category="Instruments", k_core=3,
                      out=str(out)))
    data = check_against_model(out, model(users, items, times, lambda i: True, 3))
    assert data.items[0]["description"] == "Line one two." and data.items[0]["price"] == 1299.0
    # reviews only of training interactions (never an item of the last two positions)
    reviews = data.reviews()
    assert reviews
    for r in reviews:
        assert r["item_id"] in data.train_sequence(r["user_id"])
        assert r["text"] == f"{data.sequences[r['user_id']]['user']} on {data.items[r['item_id']]['raw_id']}"


def test_movielens_100k_and_1m(tmp_path):
    rng = random.Random(7)
    users, items, times = random_log(rng, n_items=30, n=900)
    items = [str(int(i[1:]) + 1) for i in items]
    d = tmp_path / "ml-100k"
    d.mkdir()
    (d / "u.data").write_text("".join(f"{u[1:]}\t{i}\t3\t{t}\n" for u, i, t in zip(users, items, times)))
    (d / "u.genre").write_text("unknown|0\nAction|1\nComedy|2\n\n")
    (d / "u.item").write_bytes("".join(
        f"{i}|Film {i} (199{int(i) % 10})|01-Jan-1995||http://x|0|{int(i) % 2}|1\n"
        for i in sorted(set(items), key=int)).encode("latin-1"))
    run(PrepareConfig(format="movielens", input=str(d), k_core=2, out=str(tmp_path / "o1")))
    raw_users = [u[1:] for u in users]
    data = check_against_model(tmp_path / "o1", model(raw_users, items, times, lambda i: True, 2))
    rec = next(r for r in data.items if r["raw_id"] == "3")
    assert rec["title"] == "Film 3 (1993)." and rec["categories"] == ["Action", "Comedy"]

    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "ratings.dat").write_text("".join(f"{u[1:]}::{i}::3::{t}\n" for u, i, t in zip(users, items, times)))
    (d / "movies.dat").write_bytes("".join(f"{i}::Film {i} (1999)::Drama|Romance\n"
                                           for i in set(items)).encode("latin-1"))
    run(PrepareConfig(format="movielens", input=str(d), k_core=2, out=str(tmp_path / "o2")))
    data = check_against_model(tmp_path / "o2", model(raw_users, items, times, lambda i: True, 2))
    assert data.items[0]["categories"] == ["Drama", "Romance"]


def test_builtin_recbole_ml100k(tmp_path):
    """The default dataset, checked against the model run on the wheel's own files."""
    run(PrepareConfig(out=str(tmp_path / "ml")))
    d = recbole_ml100k()
    rows = [l.split("\t") for l in (d / "ml-100k.inter").read_text().splitlines()[1:]]
    seqs = model([r[0] for r in rows], [r[1] for r in rows], [float(r[3]) for r in rows],
                 lambda i: True, 5)
    data = check_against_model(tmp_path / "ml", seqs)
    toy = next(r for r in data.items if r["raw_id"] == "1")
    assert toy["title"] == "Toy Story (1995)." and "Animation" in toy["categories"]
    assert json.loads((tmp_path / "ml" / "config.json").read_text())["format"] == "recbole"


def test_bad_lines_name_file_and_line(tmp_path):
    users, items, times = random_log(random.Random(3), n=300)
    write_amazon2014(tmp_path / "raw", users, items, times, sorted(set(items)))
    path = tmp_path / "raw" / "ratings_Musical_Instruments.csv"
    text = path.read_text().splitlines()
    text[41] = "broken-line-without-commas"
    text[99] = "u1,i001,5.0,yesterday"
    path.write_text("\n".join(text) + "\n")
    cfg = PrepareConfig(format="amazon2014", input=str(tmp_path / "raw"), category="Instruments",
                        k_core=2, out=str(tmp_path / "out"))
    with pytest.raises(GreamError, match=r"ratings_Musical_Instruments.csv:42: expected 4 fields"):
        run(cfg)
    assert not (tmp_path / "out").exists()  # nothing half-written
    cfg.skip_bad_lines = True
    p = run(cfg)
    assert p.stats["bad_lines"] == {str(path): 2}


def test_corrupt_metadata_line(tmp_path):
    write_amazon2014(tmp_path / "raw", ["a"] * 3, ["i1", "i2", "i3"], [1, 2, 3], ["i1", "i2", "i3"])
    meta = tmp_path / "raw" / "meta_Musical_Instruments.json"
    lines = meta.read_text().splitlines()
    lines[1] = lines[1].replace("'title'", "__import__('os').system('x') or 'title'")
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(GreamError, match=r"meta_Musical_Instruments.json:2: not a JSON or Python-literal"):
        run(PrepareConfig(format="amazon2014", input=str(tmp_path / "raw"), category="Instruments",
                          k_core=1, out=str(tmp_path / "out")))


def test_clear_errors(tmp_path):
    with pytest.raises(GreamError, match="--format: expected one of .*, got 'csv'"):
        read("csv", tmp_path)
    with pytest.raises(GreamError, match="--category is required"):
        read("amazon2014", tmp_path)
    with pytest.raises(GreamError, match="no metadata file"):
        read("amazon2014", tmp_path, "Beauty")
    with pytest.raises(GreamError, match="not a MovieLens folder"):
        read("movielens", tmp_path)
    (tmp_path / "x.inter").write_text("user_id:token\titem:token\n1\t2\n")
    (tmp_path / "x.item").write_text("item_id:token\ttitle:token_seq\n2\tA\n")
    with pytest.raises(GreamError, match=r"x.inter:1: no column named item_id"):
        read("recbole", tmp_path, "x")


def test_empty_after_k_core_keeps_existing_output(tmp_path):
    out = tmp_path / "out"
    run(PrepareConfig(out=str(out)))
    before = (out / "sequences.jsonl").read_bytes()
    write_amazon2014(tmp_path / "raw", ["a", "b"], ["i1", "i2"], [1, 2], ["i1", "i2"])
    with pytest.raises(GreamError, match="no interactions left after the 5-core"):
        run(PrepareConfig(format="amazon2014", input=str(tmp_path / "raw"), category="Instruments",
                          out=str(out)))
    assert (out / "sequences.jsonl").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("raw, want", [
    ("Fender &amp; Co <i>Strat</i>", "Fender & Co Strat."),
    ('He said "hi"\r\nthen left...', "He said hi then left."),
    ("", ""), (None, ""), ("...", ""),
    (["first", "second."], "first second."),
    ("x" * 2500, ""),
])
def test_clean_text(raw, want):
    assert clean_text(raw) == want


def test_more_bad_inputs(tmp_path):
    (tmp_path / "x.inter").write_text("")
    (tmp_path / "x.item").write_text("item_id:token\ttitle:token_seq\n2\tA\n")
    with pytest.raises(GreamError, match=r"x.inter:1: empty file"):
        read("recbole", tmp_path, "x")
    raw = tmp_path / "raw"
    write_amazon2014(raw, ["a", "a", "a"], ["i1", "i2", "i3"], [1, "nan", 3], ["i1", "i2", "i3"])
    with pytest.raises(GreamError, match=r"ratings_Musical_Instruments.csv:2: time 'nan' is not a finite"):
        read("amazon2014", raw, "Instruments")


def test_single_string_category(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    (d / "Beauty.csv").write_text("i1,u1,5,1\n")
    (d / "meta_Beauty.json").write_text(json.dumps({"asin": "i1", "title": "T",
                                                    "category": "Skin Care"}) + "\n")
    assert read("amazon2018", d, "Beauty").meta["i1"]["categories"] == ["Skin Care"]
