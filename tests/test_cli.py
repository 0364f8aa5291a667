import json
import subprocess
import sys

import numpy as np

from gream_fast.cli import main
from gream_fast.index import SemanticIndex


def test_index_stats_and_convert(tmp_path, capsys):
    index = SemanticIndex.from_codes(np.random.default_rng(0).integers(0, 4, (100, 3)), codebook_size=8)
    src = tmp_path / "x.index.json"
    index.to_index_json(src)
    assert main(["index", "stats", str(src)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["items"] == 100 and stats["collisions"] == index.num_collisions
    dst = tmp_path / "x.safetensors"
    assert main(["index", "convert", str(src), str(dst), "--codebook-size", "8"]) == 0
    assert SemanticIndex.load(dst) == index


def test_errors_are_reported_not_raised(tmp_path, capsys):
    bad = tmp_path / "bad.index.json"
    bad.write_text('{"0": ["<|b_1|>"]}')
    assert main(["index", "stats", str(bad)]) == 2
    assert "bad.index.json" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "gream_fast.cli", "--help"], capture_output=True,
                         text=True, check=True)
    assert "index" in out.stdout
