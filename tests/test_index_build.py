import json

import numpy as np
import torch

from gream_fast.cli import main
from gream_fast.files import save_arrays
from gream_fast.index import PrefixTrie, SemanticIndex
from gream_fast.index.embed import FORMAT, VERSION
from gream_fast.index.rq import size_bounds
from gream_fast.tasks.context import load_index


def test_index_build_writes_a_usable_index(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    emb = (torch.randn(6, 16, generator=g) * 3)[torch.randint(0, 6, (120,), generator=g)]
    emb = (emb + torch.randn(120, 16, generator=g)).numpy().astype(np.float32)
    save_arrays(tmp_path / "emb.safetensors", {"embeddings": emb}, FORMAT, VERSION,
                num_items=120, dim=16)
    out = tmp_path / "idx"
    assert main(["index", "build", "--emb", str(tmp_path / "emb.safetensors"), "--out", str(out),
                 "--levels", "2", "--codebook-size", "8", "--iters", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    index = SemanticIndex.load(out / "index.safetensors")
    assert index == SemanticIndex.from_index_json(out / "items.index.json", codebook_size=8)
    assert index == load_index(out)  # what `tasks align --index DIR` reads
    lo, hi = size_bounds(120, 8)
    for l in range(2):
        sizes = np.bincount(index.codes[:, l], minlength=8)
        assert lo <= sizes.min() and sizes.max() <= hi
    PrefixTrie(index.sid_codes())  # every SID distinct, none a prefix of another
    report = json.loads((out / "report.json").read_text())
    assert report["items"] == 120 and len(report["per_level"]) == 2
    assert (out / "report.svg").read_text().startswith("<svg")
