"""Data: raw formats -> clean, k-cored, chronological sequences and item texts; the split."""
from gream_fast.data.dataset import Dataset, Examples, Split
from gream_fast.data.prepare import PrepareConfig, prepare, run
from gream_fast.data.readers import FORMATS, BadLines, RawData, read
from gream_fast.data.text import clean_text

__all__ = ["Dataset", "Examples", "Split", "PrepareConfig", "prepare", "run", "FORMATS",
           "BadLines", "RawData", "read", "clean_text"]
