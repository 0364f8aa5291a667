"""Readers for the raw formats: each turns its files into one RawData (interactions in file
order, item metadata, optional reviews). Files are streamed line by line; .gz is transparent.

Formats: amazon2014, amazon2018, movielens (ml-100k, ml-1m), recbole (atomic .inter/.item).

Input a reader cannot take as it is, the same way in every format:
- a malformed line (too few fields, an empty id, a time that is not a finite number within
  int64, a record that does not parse or has a field of the wrong type, binary data) raises a
  DataError naming file:line; with --skip-bad-lines it is skipped and counted per file
  (BadLines.counts, stats "bad_lines");
- bytes that are not valid text in the file's encoding become U+FFFD, and the line is counted
  per file (BadLines.replaced, stats "invalid_utf8_lines"); a lone surrogate escaped in JSON
  (\\ud800) is a malformed line instead, since no bytes can hold it;
- a second record of one item id (Amazon metadata, u.item, movies.dat, .item) is ignored: the
  first is kept and the duplicate counted per file (BadLines.duplicates, stats "duplicate_items";
  Amazon metadata: only items the interactions use);
- a corrupt or cut-short .gz file always raises: a gzip stream cannot be read past the damage.
"""
import ast
import gzip
import math
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gream_fast.data.text import clean_label, clean_text
from gream_fast.errors import DataError, InvalidInputError
from gream_fast.files import loads

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


def _add(counts: dict, path) -> None:
    counts[str(path)] = counts.get(str(path), 0) + 1


@dataclass
class BadLines:
    """What to do with a malformed line: raise (default) or count and go on (--skip-bad-lines);
    also counts, per file, lines with invalid text and ignored duplicate item records."""

    skip: bool = False
    counts: dict = field(default_factory=dict)  # file -> malformed lines skipped
    replaced: dict = field(default_factory=dict)  # file -> lines with bytes replaced by U+FFFD
    duplicates: dict = field(default_factory=dict)  # file -> item records ignored (id seen before)

    def __call__(self, path, lineno: int, why) -> None:
        """`why`: text, or a DataError that already names file:line (files.loads)."""
        if not self.skip:
            raise why if isinstance(why, DataError) else DataError(f"{path}:{lineno}: {why}")
        _add(self.counts, path)

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


def lines(path, bad: BadLines | None = None, encoding="utf-8"):
    """(1-based line number, line without its line break) for each non-blank line. Invalid bytes
    become U+FFFD (the line counted in bad.replaced); a line with a NUL byte is binary data, a bad
    line. An unreadable file or a damaged .gz raises a DataError naming the file and how far it
    was read."""
    bad = bad if bad is not None else BadLines()
    path = Path(path)
    gz = path.suffix == ".gz"
    n = 0
    # surrogateescape keeps text-mode speed; an escaped byte shows up as a lone surrogate,
    # which UTF-8 cannot encode: only such (rare, non-ASCII) lines are decoded again
    kw = dict(encoding=encoding, errors="surrogateescape", newline="")
    try:
        with gzip.open(path, "rt", **kw) if gz else open(path, **kw) as f:
            for n, line in enumerate(f, 1):
                if not line.isascii():
                    try:
                        line.encode("utf-8")
                    except UnicodeEncodeError:
                        line = line.encode(encoding, "surrogateescape").decode(encoding, "replace")
                        _add(bad.replaced, path)
                line = line.rstrip("\r\n")
                if "\0" in line:
                    bad(path, n, "binary data (a NUL byte); expected a line of text")
                elif line.strip():
                    yield n, line
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a folder; expected a data file") from None
    except PermissionError:
        raise DataError(f"{path}: cannot read it (permission denied)") from None
    except (EOFError, OSError, zlib.error) as e:  # gzip: BadGzipFile (an OSError), EOFError, zlib
        where = f"after line {n}" if n else "before its first line"
        if not gz:
            raise DataError(f"{path}: cannot read it {where} ({e})") from None
        what = ("the gzip data ends early: the file is cut short" if isinstance(e, EOFError)
                else f"not a gzip file or corrupt gzip data ({e})")
        raise DataError(f"{path}: {what}; stopped {where}. Download or compress it again "
                        "(--skip-bad-lines cannot skip this: nothing after the damage can be "
                        "read)") from None


def _find(directory: Path, patterns: list, what: str, required=True):
    for pattern in patterns:
        hits = sorted(p for p in directory.glob(pattern) if p.is_file())
        if hits:
            return hits[0]
    if required:
        raise InvalidInputError(
            f"{directory}: no {what} file (looked for {', '.join(patterns)})")
    return None


# -- fields: one checker per kind of value, shared by every reader; each raises ValueError -------
_INT64 = 2.0 ** 63


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _time(value, name: str = "time") -> float:
    """A timestamp: a finite number within int64 (times are written as integers)."""
    try:
        t = float(value)
    except (TypeError, ValueError, OverflowError):
        t = math.nan
    if -_INT64 <= t < _INT64 and type(value) is not bool:  # NaN compares False
        return t
    if math.isfinite(t):
        raise ValueError(f"{name} {_show(value)} is out of range (expected a Unix time in "
                         "-2^63..2^63)")
    raise ValueError(f"{name} {_show(value)} is not a finite number")


def _unicode(text: str, name: str) -> str:
    """A JSON string may escape a lone surrogate (\\ud800), which no UTF-8 file can hold."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"field {name!r}: not valid Unicode (a lone surrogate)") from None
    return text


def _id(value, name: str) -> str:
    """An id: non-empty text (an integer is taken as its digits), surrounding spaces dropped."""
    if type(value) is str:
        value = value.strip()
        if value and (value.isascii() or _unicode(value, name)):
            return value
    elif type(value) is int:
        return str(value)
    raise ValueError(f"{name} {_show(value)}: expected a non-empty id")


def _texts(value, name: str, depth: int = 1) -> list:
    """A text field as a list of strings: text, a number, or lists of them nested up to
    `depth` (2014 category paths are lists of lists); absent gives []."""
    if value is None:
        return []
    if isinstance(value, str):
        return [_unicode(value, name)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, (list, tuple)) and depth > 0:
        return [s for v in value for s in _texts(v, name, depth - 1)]
    raise ValueError(f"field {name!r}: expected text{' or a list of texts' if depth else ''}, "
                     f"got {type(value).__name__}")


def _price(value):
    """Amazon prices come as numbers (2014) or strings like '$12.99' (2018); None if absent or
    without digits."""
    if isinstance(value, str):
        m = re.search(r"\d+(?:\.\d+)?", value.replace(",", ""))
        if m is None:
            return None
        value = float(m.group())
    elif value is None:
        return None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"field 'price': expected a number or text, got {type(value).__name__}")
    try:
        price = float(value)
    except OverflowError:
        price = math.inf
    if not math.isfinite(price):
        raise ValueError(f"price {_show(value)} is not a finite number")
    return price


def _item(title, description=None, categories=None, brand=None, price=None) -> dict:
    rec = {"title": clean_text(_texts(title, "title")),
           "description": clean_text(_texts(description, "description")),
           "categories": [c for c in dict.fromkeys(
               clean_label(c) for c in _texts(categories, "categories", 2)) if c],
           "brand": clean_label(" ".join(_texts(brand, "brand", 0)))}
    price = _price(price)
    if price is not None:
        rec["price"] = price
    return rec


def _add_item(meta: dict, item_id, bad: BadLines, path, **fields) -> None:
    """meta[id] = the cleaned record, unless the id has one: the first record is kept and the
    duplicate counted (bad.duplicates)."""
    key = _id(item_id, "item id")
    if key in meta:
        _add(bad.duplicates, path)
    else:
        meta[key] = _item(**fields)


def _take(acc: tuple, user, item, time) -> None:
    """Append one interaction to acc = (users, items, times), all of it or (ValueError) none."""
    user, item, time = _id(user, "user id"), _id(item, "item id"), _time(time)
    acc[0].append(user)
    acc[1].append(item)
    acc[2].append(time)


def _raw(acc: tuple) -> tuple:
    return acc[0], acc[1], np.asarray(acc[2], dtype=np.float64)


# -- interactions ---------------------------------------------------------------------------------
def _read_csv_interactions(path, bad, user_col, item_col, time_col, sep=",", min_cols=4):
    acc = ([], [], [])
    for n, line in lines(path, bad):
        parts = line.split(sep)
        if len(parts) < min_cols:
            bad(path, n, f"expected {min_cols} fields separated by {sep!r}, got {len(parts)}")
            continue
        try:
            _take(acc, parts[user_col], parts[item_col], parts[time_col])
        except ValueError as e:
            bad(path, n, e)
    return _raw(acc)


# Fields of Amazon metadata we never use; `related` (lists of co-purchased asins) is most of a
# line's bytes, and Python-literal parsing is slow, so it is cut out before parsing.
_UNUSED = re.compile(r"""(?:,\s*)?["'](?:related|salesRank)["']\s*:\s*\{[^{}]*\}""")
_LITERAL_ERRORS = (ValueError, SyntaxError, TypeError, MemoryError, RecursionError)


def _parse_record(line: str, literal_ok: bool, where: str) -> dict:
    """A JSON object (no NaN / Infinity: files.loads), or (Amazon 2014) a Python-literal dict
    parsed without eval. ValueError (a DataError naming `where` for JSON) if it is neither."""
    try:
        rec = loads(line, where)
    except DataError:
        if not literal_ok:
            raise
        short, cuts = _UNUSED.subn("", line)
        for text in (short, line) if cuts else (short,):  # a cut gone wrong: the whole line
            try:
                rec = ast.literal_eval(text)  # literals only: never executes code
                break
            except _LITERAL_ERRORS as e:
                err = e
        else:
            raise ValueError(f"not a JSON or Python-literal record ({type(err).__name__})")
    if not isinstance(rec, dict):
        raise ValueError(f"expected a record {{...}}, got {type(rec).__name__}")
    return rec


def _read_amazon_meta(path, bad, literal_ok, wanted) -> dict:
    """Metadata records of the items in `wanted` (others are skipped before parsing: metadata
    files list far more items than the ratings keep)."""
    asin = re.compile(r"""["']asin["']\s*:\s*["']([^"']+)["']""")
    meta = {}
    for n, line in lines(path, bad):
        m = asin.search(line)
        if m is None:
            bad(path, n, "no 'asin' field")
            continue
        if m.group(1).strip() not in wanted:
            continue
        try:
            rec = _parse_record(line, literal_ok, f"{path}:{n}")
            if _id(rec.get("asin"), "asin") in wanted:
                _add_item(meta, rec["asin"], bad, path, title=rec.get("title"),
                          description=rec.get("description"),
                          categories=rec.get("categories") or rec.get("category"),
                          brand=rec.get("brand"), price=rec.get("price"))
        except ValueError as e:
            bad(path, n, e)
    return meta


def _amazon_reviews(path, bad, literal_ok):
    passes = []

    def read():
        # read twice when the reviews are the interactions too: count bad lines once
        b = BadLines(skip=True) if passes else bad
        passes.append(1)
        for n, line in lines(path, b):
            try:
                rec = _parse_record(line, literal_ok, f"{path}:{n}")
                row = (_id(rec.get("reviewerID"), "reviewerID"), _id(rec.get("asin"), "asin"),
                       " ".join(_texts(rec.get("reviewText"), "reviewText", 0)),
                       " ".join(_texts(rec.get("summary"), "summary", 0)),
                       _time(rec.get("unixReviewTime"), "unixReviewTime"))
            except ValueError as e:
                b(path, n, e)
                continue
            yield row
    return read


def _interactions_from_reviews(read):
    acc = ([], [], [])
    for u, i, _, _, t in read():
        _take(acc, u, i, t)  # checked already by the review reader
    return _raw(acc)


def read_amazon(directory, category: str, year: int, bad: BadLines) -> RawData:
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
def _need(d: Path, names: tuple, what: str) -> None:
    for name in names:
        if not (d / name).is_file():
            raise InvalidInputError(f"{d}: no {name} ({what} needs {' and '.join(names)} in "
                                    "this folder)")


def read_movielens(directory, bad: BadLines) -> RawData:
    d = Path(directory)
    meta = {}
    if (d / "u.data").is_file():  # ml-100k
        _need(d, ("u.data", "u.item"), "MovieLens-100K")
        users, items, times = _read_csv_interactions(d / "u.data", bad, 0, 1, 3, sep="\t")
        genres = []
        if (d / "u.genre").is_file():
            genres = [line.split("|")[0] for _, line in lines(d / "u.genre", bad, "latin-1")]
        for n, line in lines(d / "u.item", bad, "latin-1"):
            parts = line.split("|")
            if len(parts) < 5:
                bad(d / "u.item", n, f"expected at least 5 '|'-separated fields, got {len(parts)}")
                continue
            cats = [g for g, f in zip(genres, parts[5:]) if f == "1"]
            try:
                _add_item(meta, parts[0], bad, d / "u.item", title=parts[1], categories=cats)
            except ValueError as e:
                bad(d / "u.item", n, e)
        files = {"interactions": str(d / "u.data"), "metadata": str(d / "u.item")}
    elif (d / "ratings.dat").is_file():  # ml-1m
        _need(d, ("ratings.dat", "movies.dat"), "MovieLens-1M")
        users, items, times = _read_csv_interactions(d / "ratings.dat", bad, 0, 1, 3, sep="::")
        for n, line in lines(d / "movies.dat", bad, "latin-1"):
            parts = line.split("::")
            if len(parts) != 3:
                bad(d / "movies.dat", n, f"expected 3 '::'-separated fields, got {len(parts)}")
                continue
            try:
                _add_item(meta, parts[0], bad, d / "movies.dat", title=parts[1],
                          categories=parts[2].split("|"))
            except ValueError as e:
                bad(d / "movies.dat", n, e)
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


def _header(it, path) -> list:
    """Column names of an atomic file's 'name:type' header (its first non-blank line)."""
    first = next(it, None)
    if first is None:
        raise DataError(f"{path}:1: empty file (expected a 'name:type' header)")
    n, line = first
    names = []
    for col in line.split("\t"):
        name, _, kind = col.partition(":")
        if not kind:
            raise DataError(f"{path}:{n}: header field {_show(col)} is not 'name:type'")
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
        if not p.is_file():
            raise InvalidInputError(f"{p}: no such file (RecBole atomic files {name}.inter and "
                                    f"{name}.item are needed)")
    it = lines(inter, bad)
    names = _header(it, inter)
    cu, ci = _column(names, inter, "user_id"), _column(names, inter, "item_id")
    ct = _column(names, inter, "timestamp", "time", required=False)
    acc = ([], [], [])
    for n, line in it:
        parts = line.split("\t")
        if len(parts) != len(names):
            bad(inter, n, f"expected {len(names)} tab-separated fields, got {len(parts)}")
            continue
        try:  # no time column: file order
            _take(acc, parts[cu], parts[ci], parts[ct] if ct is not None else n)
        except ValueError as e:
            bad(inter, n, e)
    it = lines(item, bad)
    names = _header(it, item)
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
        try:
            _add_item(meta, parts[cid], bad, item, title=title,
                      description=parts[cdesc] if cdesc is not None else None,
                      categories=parts[ccat].split() if ccat is not None else None,
                      brand=parts[cbrand] if cbrand is not None else None,
                      price=parts[cprice] if cprice is not None else None)
        except ValueError as e:
            bad(item, n, e)
    return RawData(*_raw(acc), meta, None, {"interactions": str(inter), "metadata": str(item)})


def check_args(fmt: str, path=None, category: str | None = None) -> None:
    """Refuse a bad format, input folder or category before anything is read, naming the flag."""
    if fmt not in FORMATS:
        raise InvalidInputError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt.startswith("amazon") and not category:
        raise InvalidInputError(f"--category is required for {fmt} (e.g. Instruments, Beauty, "
                                "Sports, or a full name such as Musical_Instruments)")
    if category and (re.search(r"[/\\*?\[\]]", category) or category in (".", "..")):
        raise InvalidInputError(f"--category {category!r}: expected a name, not a path or a "
                                "pattern")
    if path is None:
        if fmt != "recbole":
            raise InvalidInputError(f"--input is required for format {fmt}")
        return
    path = Path(path)
    if not path.is_dir():
        raise InvalidInputError(
            f"--input {path}: " + ("a file; expected the folder that holds the raw files"
                                   if path.exists() else "no such folder"))
    if not os.access(path, os.R_OK | os.X_OK):
        raise InvalidInputError(f"--input {path}: cannot read this folder (permission denied)")


def read(fmt: str, path=None, category: str | None = None, bad: BadLines | None = None) -> RawData:
    """Read one dataset. With fmt='recbole' and no path: the built-in MovieLens-100K."""
    bad = bad if bad is not None else BadLines()
    check_args(fmt, path, category)
    if path is None:
        return read_recbole(recbole_ml100k(), bad)
    if fmt == "amazon2014":
        return read_amazon(path, category, 2014, bad)
    if fmt == "amazon2018":
        return read_amazon(path, category, 2018, bad)
    if fmt == "movielens":
        return read_movielens(path, bad)
    return read_recbole(path, bad, category)
