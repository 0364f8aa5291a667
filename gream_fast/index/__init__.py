"""Item indexing: semantic IDs, their tokens, and the prefix trie over them."""
from gream_fast.index.rq import RQResult, kmeans, rq_kmeans
from gream_fast.index.semantic_index import (LEVEL_LETTERS, MAX_CODEBOOK_SIZE, SemanticIndex,
                                             load_index, sid_token)
from gream_fast.index.tokens import add_sid_tokens, is_contiguous, sid_token_table
from gream_fast.index.trie import PrefixTrie

__all__ = ["rq_kmeans", "kmeans", "RQResult", "PrefixTrie", "SemanticIndex", "sid_token", "LEVEL_LETTERS",
           "MAX_CODEBOOK_SIZE", "load_index", "add_sid_tokens", "sid_token_table", "is_contiguous"]
