"""Readers for the raw formats: each turns its files into one RawData (interactions in file
order, item metadata, optional reviews). Files are streamed line by line; .gz is transparent.

Formats: amazon2014, amazon2018, movielens (ml-100k, ml-1m), recbole (atomic .inter/.item).
"""
import ast
import gzip
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gream_fast.data.text import clean_label, clean_text
from gream_fast.errors import DataError, InvalidInputError

FORMATS = ("amazon2014", "amazon2018", "movielens", "recbole")

# Short names of the paper's (and other common) Amazon categories -> their file names.
AMAZON_CATEGORIES = {
    "Instruments": "Musical_Instruments", "Sports": "Sports_and_Outdoors", "Beauty": "Beauty",
    "Toys": "Toys_and_Games", "Office": "Office_Products", "Arts": "Arts_Crafts_and_Sewing",
    "Games": "Video_Games", "Home": "Home_and_Kitchen", "Clothing": "Clothing_Shoes_and_Jewelry",
    "Pets": "Pet_Supplies", "Grocery": "Grocery_and_Gourmet_Food", "Tools": "Tools_and_Home_Improvement",
    "CDs": "CDs_and_Vinyl", "Cell": "Cell_Phones_and_Accessories", "Phones": "Cell_Phones_and_Accessories",
    "Health": "Health_and_Personal_Care", "Automotive": "Automotive", "Electronics": "Electronics",
    "Industrial": "Industrial_and_Scientific", "Kindle": "Kindle_Store", "Movies": "Movies_and_TV",
    "Software": "Software", "Garden": "Patio_Lawn_and_Garden", "Baby": "Baby",
}


@dataclass
class BadLines:
    """What to do with a malformed line: raise (default) or count and go on (--skip-bad-lines)."""

    skip: bool = False
    counts: dict = field(default_factory=dict)

    def __call__(self, path, lineno: int, why: str) -> None:
        if not self.skip:
            raise DataError(f"{path}:{lineno}: {why}")
        self.counts[str(path)] = self.counts.get(str(path), 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class RawData:
    """One dataset as read: interactions in file order, metadata by raw item id."""

    users: list  # raw user id per interaction
    items: list  # raw item id per interaction
    times: np.ndarray  # float64 per interaction
    meta: dict  # raw item id -> {"title", "description", "categories", "brand"[, "price"]}
    reviews: Callable[[], Iterator[tuple]] | None = None  # () -> (user, item, text, summary, time)
    files: dict = field(default_factory=dict)


def open_text(path, encoding="utf-8"):
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding=encoding, errors="replace", newline="")
    return open(path, encoding=encoding, errors="replace", newline="")


def lines(path, encoding="utf-8"):
    """(1-based line number, line without its newline) for each non-blank line."""
    with open_text(path, encoding) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield n, line


def _find(directory: Path, patterns: list, what: str, required=True):
    for pattern in patterns:
        hits = sorted(directory.glob(pattern))
        if hits:
            return hits[0]
    if required:
        raise InvalidInputError(
            f"{directory}: no {what} file (looked for {', '.join(patterns)})")
    return None


def _item(title, description="", categories=(), brand="", price=None) -> dict:
    rec = {"title": clean_text(title), "description": clean_text(description),
           "categories": [c for c in (clean_label(c) for c in categories) if c],
           "brand": clean_label(brand)}
    if price is not None:
        rec["price"] = price
    return rec


def _price(value):
    """Amazon prices come as numbers (2014) or strings like '$12.99' (2018); None if absent."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = re.search(r"\d+(?:\.\d+)?", value.replace(",", ""))
        return float(m.group()) if m else None
    return None


def _flatten(categories) -> list:
    """Amazon 2014 categories are a list of paths (lists); keep each label once, in order."""
    if isinstance(categories, str):  # some dumps give one label as a plain string
        categories = [categories]
    out = []
    for c in categories or []:
        for label in (c if isinstance(c, list) else [c]):
            if label not in out:
                out.append(label)
    return out


# -- interactions ---------------------------------------------------------------------------------
def _read_csv_interactions(path, bad, user_col, item_col, time_col, sep=",", min_cols=4):
    users, items, times = [], [], []
    for n, line in lines(path):
        parts = line.split(sep)
        if len(parts) < min_cols:
            bad(path, n, f"expected {min_cols} fields separated by {sep!r}, got {len(parts)}")
            continue
        try:
            t = float(parts[time_col])
        except ValueError:
            t = float("nan")
        if not math.isfinite(t):
            bad(path, n, f"time {parts[time_col]!r} is not a finite number")
            continue
        u, i = parts[user_col].strip(), parts[item_col].strip()
        if not u or not i:
            bad(path, n, "empty user or item id")
            continue
        users.append(u)
        items.append(i)
        times.append(t)
    return users, items, np.asarray(times, dtype=np.float64)


# Fields of Amazon metadata we never use; `related` (lists of co-purchased asins) is most of a
# line's bytes, and Python-literal parsing is slow, so it is cut out before parsing.
_UNUSED = re.compile(r"""(?:,\s*)?["'](?:related|salesRank)["']\s*:\s*\{[^{}]*\}""")


def _parse_record(line: str, literal_ok: bool):
    """A JSON object, or (Amazon 2014 metadata) a Python-literal dict parsed without eval."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        if not literal_ok:
            raise
    short, cuts = _UNUSED.subn("", line)
    try:
        return ast.literal_eval(short)  # literals only: never executes code
    except (ValueError, SyntaxError):
        if not cuts:
            raise
        return ast.literal_eval(line)  # the cut went wrong somewhere: parse the whole line


def _read_amazon_meta(path, bad, literal_ok, wanted) -> dict:
    """Metadata records of the items in `wanted` (others are skipped before parsing: metadata
    files list far more items than the ratings keep)."""
    asin = re.compile(r"""["']asin["']\s*:\s*["']([^"']+)["']""")
    meta = {}
    for n, line in lines(path):
        m = asin.search(line)
        if m is None:
            bad(path, n, "no 'asin' field")
            continue
        if m.group(1) not in wanted:
            continue
        try:
            rec = _parse_record(line, literal_ok)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            bad(path, n, f"not a {'JSON or Python-literal' if literal_ok else 'JSON'} record "
                         f"({type(e).__name__})")
            continue
        if not isinstance(rec, dict):
            bad(path, n, "expected a record (dict)")
            continue
        meta[rec.get("asin", m.group(1))] = _item(
            rec.get("title"), rec.get("description"),
            _flatten(rec.get("categories") or rec.get("category")), rec.get("brand"),
            _price(rec.get("price")))
    return meta


def _amazon_reviews(path, bad, literal_ok):
    def read():
        for n, line in lines(path):
            try:
                rec = _parse_record(line, literal_ok)
                yield (rec["reviewerID"], rec["asin"], rec.get("reviewText") or "",
                       rec.get("summary") or "", float(rec.get("unixReviewTime") or 0))
            except (ValueError, SyntaxError, KeyError, TypeError) as e:
                bad(path, n, f"not a review record ({type(e).__name__}: {e})")
    return read


def _interactions_from_reviews(read):
    users, items, times = [], [], []
    for u, i, _, _, t in read():
        users.append(u)
        items.append(i)
        times.append(t)
    return users, items, np.asarray(times, dtype=np.float64)


def read_amazon(directory, category: str, year: int, bad: BadLines) -> RawData:
    if not category:
        raise InvalidInputError(f"--category is required for amazon{year} (e.g. Instruments, "
                                "Beauty, Sports, or a full name such as Musical_Instruments)")
    name = AMAZON_CATEGORIES.get(category, category)
    d = Path(directory)
    literal = year == 2014
    if year == 2014:
        ratings = _find(d, [f"ratings_{name}.csv", f"ratings_{name}.csv.gz"], "ratings", False)
        reviews = _find(d, [f"reviews_{name}.json.gz", f"reviews_{name}.json",
                            f"reviews_{name}_5.json.gz", f"reviews_{name}_5.json"], "reviews", False)
        meta_path = _find(d, [f"meta_{name}.json.gz", f"meta_{name}.json"], "metadata")
        cols = dict(user_col=0, item_col=1, time_col=3)
    else:
        ratings = _find(d, [f"{name}.csv", f"{name}.csv.gz"], "ratings", False)
        reviews = _find(d, [f"{name}.json.gz", f"{name}.json", f"{name}_5.json.gz",
                            f"{name}_5.json"], "reviews", False)
        meta_path = _find(d, [f"meta_{name}.json.gz", f"meta_{name}.json"], "metadata")
        cols = dict(user_col=1, item_col=0, time_col=3)
    read_reviews = _amazon_reviews(reviews, bad, literal) if reviews else None
    if ratings is not None:
        users, items, times = _read_csv_interactions(ratings, bad, **cols)
    elif read_reviews is not None:  # the 5-core review dumps carry the interactions themselves
        users, items, times = _interactions_from_reviews(read_reviews)
    else:
        raise InvalidInputError(f"{d}: no ratings or reviews file for category {name!r}")
    meta = _read_amazon_meta(meta_path, bad, literal, set(items))
    files = {"interactions": str(ratings or reviews), "metadata": str(meta_path)}
    if reviews:
        files["reviews"] = str(reviews)
    return RawData(users, items, times, meta, read_reviews, files)


# -- MovieLens ------------------------------------------------------------------------------------
def read_movielens(directory, bad: BadLines) -> RawData:
    d = Path(directory)
    if (d / "u.data").exists():  # ml-100k
        users, items, times = _read_csv_interactions(d / "u.data", bad, 0, 1, 3, sep="\t")
        genres = []
        if (d / "u.genre").exists():
            genres = [line.split("|")[0] for _, line in lines(d / "u.genre", "latin-1")]
        meta = {}
        for n, line in lines(d / "u.item", "latin-1"):
            parts = line.split("|")
            if len(parts) < 5:
                bad(d / "u.item", n, f"expected at least 5 '|'-separated fields, got {len(parts)}")
                continue
            flags = parts[5:]
            cats = [g for g, f in zip(genres, flags) if f == "1"] if genres else []
            meta[parts[0]] = _item(parts[1], categories=cats)
        files = {"interactions": str(d / "u.data"), "metadata": str(d / "u.item")}
    elif (d / "ratings.dat").exists():  # ml-1m
        users, items, times = _read_csv_interactions(d / "ratings.dat", bad, 0, 1, 3, sep="::")
        meta = {}
        for n, line in lines(d / "movies.dat", "latin-1"):
            parts = line.split("::")
            if len(parts) != 3:
                bad(d / "movies.dat", n, f"expected 3 '::'-separated fields, got {len(parts)}")
                continue
            meta[parts[0]] = _item(parts[1], categories=parts[2].split("|"))
        files = {"interactions": str(d / "ratings.dat"), "metadata": str(d / "movies.dat")}
    else:
        raise InvalidInputError(f"{d}: not a MovieLens folder (expected u.data + u.item for "
                                "ml-100k or ratings.dat + movies.dat for ml-1m)")
    return RawData(users, items, times, meta, None, files)


# -- RecBole atomic files -------------------------------------------------------------------------
def recbole_ml100k() -> Path:
    """The MovieLens-100K that the recbole wheel carries: the built-in default dataset."""
    try:
        import recbole
    except ImportError:
        raise InvalidInputError("the built-in dataset needs the recbole wheel: "
                                "pip install --no-deps recbole==1.2.1") from None
    return Path(recbole.__file__).parent / "dataset_example" / "ml-100k"


def _first(it, path) -> str:
    first = next(it, None)
    if first is None:
        raise DataError(f"{path}:1: empty file (expected a 'name:type' header)")
    return first[1]


def _atomic_header(path, line: str) -> list:
    names = []
    for col in line.split("\t"):
        name, _, kind = col.partition(":")
        if not kind:
            raise DataError(f"{path}:1: header field {col!r} is not 'name:type'")
        names.append(name)
    return names


def _column(names, path, *candidates, required=True):
    for c in candidates:
        if c in names:
            return names.index(c)
    if required:
        raise DataError(f"{path}:1: no column named {' or '.join(candidates)} "
                        f"(columns: {', '.join(names)})")
    return None


def read_recbole(directory, bad: BadLines, name: str | None = None) -> RawData:
    d = Path(directory)
    name = name or d.name
    inter, item = d / f"{name}.inter", d / f"{name}.item"
    for p in (inter, item):
        if not p.exists():
            raise InvalidInputError(f"{p}: no such file (RecBole atomic files {name}.inter and "
                                    f"{name}.item are needed)")
    it = lines(inter)
    names = _atomic_header(inter, _first(it, inter))
    cu, ci = _column(names, inter, "user_id"), _column(names, inter, "item_id")
    ct = _column(names, inter, "timestamp", "time", required=False)
    users, items, times = [], [], []
    for n, line in it:
        parts = line.split("\t")
        if len(parts) != len(names):
            bad(inter, n, f"expected {len(names)} tab-separated fields, got {len(parts)}")
            continue
        try:
            t = float(parts[ct]) if ct is not None else float(n)  # no time column: file order
        except ValueError:
            bad(inter, n, f"time {parts[ct]!r} is not a number")
            continue
        users.append(parts[cu])
        items.append(parts[ci])
        times.append(t)
    it = lines(item)
    names = _atomic_header(item, _first(it, item))
    cid = _column(names, item, "item_id")
    ctitle = _column(names, item, "title", "movie_title", "item_title", "name")
    cyear = _column(names, item, "release_year", "year", required=False)
    cdesc = _column(names, item, "description", "desc", "plot", required=False)
    ccat = _column(names, item, "categories", "category", "class", "genre", "genres", required=False)
    cbrand = _column(names, item, "brand", required=False)
    cprice = _column(names, item, "price", required=False)
    meta = {}
    for n, line in it:
        parts = line.split("\t")
        if len(parts) != len(names):
            bad(item, n, f"expected {len(names)} tab-separated fields, got {len(parts)}")
            continue
        title = parts[ctitle]
        if cyear is not None and parts[cyear].strip():
            title = f"{title} ({parts[cyear].strip()})"
        meta[parts[cid]] = _item(
            title, parts[cdesc] if cdesc is not None else "",
            parts[ccat].split() if ccat is not None else (),
            parts[cbrand] if cbrand is not None else "",
            _price(parts[cprice]) if cprice is not None and parts[cprice].strip() else None)
    return RawData(users, items, np.asarray(times, dtype=np.float64), meta, None,
                   {"interactions": str(inter), "metadata": str(item)})


def read(fmt: str, path=None, category: str | None = None, bad: BadLines | None = None) -> RawData:
    """Read one dataset. With fmt='recbole' and no path: the built-in MovieLens-100K."""
    bad = bad or BadLines()
    if fmt not in FORMATS:
        raise InvalidInputError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if path is None:
        if fmt != "recbole":
            raise InvalidInputError(f"--input is required for format {fmt}")
        return read_recbole(recbole_ml100k(), bad)
    path = Path(path)
    if not path.is_dir():
        raise InvalidInputError(f"{path}: not a folder (--input names the folder with the raw files)")
    if fmt == "amazon2014":
        return read_amazon(path, category, 2014, bad)
    if fmt == "amazon2018":
        return read_amazon(path, category, 2018, bad)
    if fmt == "movielens":
        return read_movielens(path, bad)
    return read_recbole(path, bad, category)
