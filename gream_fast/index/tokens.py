"""SID tokens in a Hugging Face tokenizer: add them, and map SIDs to token ids."""
import numpy as np

from gream_fast.errors import InvalidInputError
from gream_fast.index.semantic_index import SemanticIndex


def add_sid_tokens(tokenizer, model=None, *, index: SemanticIndex) -> np.ndarray:
    """Add every SID token string ((L + 1) levels x K codes) to `tokenizer` as special tokens, one
    id each, and resize `model`'s embeddings to match. New tokens get contiguous ids when none
    was in the vocabulary before. Returns the id table [L + 1, K]."""
    strings = index.token_strings()
    vocab = tokenizer.get_vocab()
    new = [s for s in strings if s not in vocab]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    table = sid_token_table(tokenizer, index)
    if model is not None:
        rows = model.get_input_embeddings().weight.shape[0]
        if rows < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    return table


def sid_token_table(tokenizer, index: SemanticIndex) -> np.ndarray:
    """Token id of every SID string, [L + 1, K]; each must be a single token of `tokenizer`."""
    strings = index.token_strings()
    vocab = tokenizer.get_vocab()
    missing = [s for s in strings if s not in vocab]
    if missing:
        raise InvalidInputError(
            f"tokenizer has no token {missing[0]!r} ({len(missing)} SID tokens missing): call "
            "add_sid_tokens(tokenizer, model, index=...) first")
    ids = np.array([vocab[s] for s in strings], dtype=np.int64)
    return ids.reshape(index.num_levels + 1, index.codebook_size)


def is_contiguous(table: np.ndarray) -> bool:
    """True when the SID ids form one block (first, first + 1, ...), so a level's tokens are a
    slice of the LM head."""
    flat = table.reshape(-1)
    return bool(np.array_equal(flat, np.arange(flat[0], flat[0] + flat.size)))
