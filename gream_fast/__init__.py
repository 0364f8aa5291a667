"""gream-fast: generative reasoning recommendation with LLMs (GREAM), built for speed.

Import what you need from the subpackages: `gream_fast.index` (prefix trie, semantic IDs),
`gream_fast.kernels` (Triton kernels with torch references), `gream_fast.train` (rewards, ...).
"""
from gream_fast.errors import DataError, FormatError, GreamError, InvalidInputError, OutputError

__version__ = "0.1.0"
__all__ = ["GreamError", "InvalidInputError", "FormatError", "DataError", "OutputError",
           "__version__"]
