"""A small synthetic dataset and a SemanticIndex with a collision, shared by the training and
evaluation tests (written once per test module)."""
import numpy as np

from gream_fast.data import Dataset
from gream_fast.data.prepare import prepare, write
from gream_fast.data.synth import SynthConfig, synthesize
from gream_fast.index import SemanticIndex

LEVELS, K = 3, 4


def make_data_and_index(root, users: int = 40):
    """root/data (a `data prepare` folder) and root/index (index.safetensors) -> (data, index)."""
    write(prepare(synthesize(SynthConfig(users=users, items=14, mean_length=8, seed=3)), k_core=3),
          root / "data")
    data = Dataset.load(root / "data")
    codes = np.random.default_rng(0).integers(0, K, (data.num_items, LEVELS))
    codes[1] = codes[0]  # a collision: SIDs of LEVELS and LEVELS + 1 tokens
    index = SemanticIndex.from_codes(codes, K)
    (root / "index").mkdir()
    index.save(root / "index" / "index.safetensors")
    return data, index
