"""Which item index a model was trained with, and the check that it is the one it runs with.

A model only knows items through SIDs: given another index (the same items in another order, a
subset, another build), it recommends other items, or never the missing ones, with no error.
So every training stage records the index's fingerprint (SemanticIndex.fingerprint) in the
model's config (config.json, key INDEX_KEY: it travels with every save_pretrained), and every
command that pairs a model with an index (recommend, eval, train srpo, the TRL adapter) checks
it, unless told to accept a mismatch.
"""
import json
import warnings
from pathlib import Path

from gream_fast.errors import FormatError, InvalidInputError

INDEX_KEY = "gream_index"
INDEX_MISMATCH_HELP = ("run with an index the model was not trained with (its config records "
                       "the index's fingerprint): a mismatch is otherwise an error")


def index_record(index) -> dict:
    """What a model folder records of its index: the fingerprint and the shape, for messages."""
    return {"fingerprint": index.fingerprint(), "items": index.num_items,
            "levels": index.num_levels, "codebook_size": index.codebook_size}


def attach(model, index) -> None:
    """Record `index` in the model's config (saved with it from now on)."""
    setattr(model.config, INDEX_KEY, index_record(index))


def recorded(model) -> dict | None:
    """The record of a model, or of a model folder (read from its config.json), or None."""
    if isinstance(model, (str, Path)):
        path = Path(model) / "config.json"
        if not path.is_file():
            raise FormatError(f"{model}: not a Hugging Face model folder (no config.json)")
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise FormatError(f"{path}: not a readable model config ({e})") from None
        rec = config.get(INDEX_KEY) if isinstance(config, dict) else None
    else:
        rec = getattr(model.config, INDEX_KEY, None)
    if rec is not None and not (isinstance(rec, dict) and isinstance(rec.get("fingerprint"), str)):
        raise FormatError(f"{model}: config.json's {INDEX_KEY!r} is not an index record")
    return rec


def check_pairing(model, index, *, index_name: str = "--index", allow_mismatch: bool = False,
                  flag: str = "--allow-index-mismatch") -> None:
    """Raise InvalidInputError when the model (an object or a folder) was trained with another
    index than `index`; with allow_mismatch, warn instead. A model that records no index
    (trained before records existed, or without an index) gets a warning: it cannot be
    checked."""
    rec = recorded(model)
    name = model if isinstance(model, (str, Path)) else getattr(model.config, "_name_or_path",
                                                               "the model")
    if rec is None:
        warnings.warn(f"{name} records no item index, so {index_name} cannot be checked "
                      "against the one it was trained with")
        return
    fp = index.fingerprint()
    if rec["fingerprint"] == fp:
        return
    msg = (f"{index_name}: index {fp} ({index.num_items} items, {index.num_levels} levels x "
           f"{index.codebook_size}) is not the index {name} was trained with ({rec['fingerprint']}"
           f", {rec.get('items')} items, {rec.get('levels')} levels x {rec.get('codebook_size')}"
           "): it would recommend other items")
    if allow_mismatch:
        warnings.warn(msg + f" ({flag}: running anyway)")
        return
    raise InvalidInputError(msg + f"; pass {flag} to run anyway")
