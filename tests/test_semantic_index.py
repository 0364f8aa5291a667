import json

import numpy as np
import pytest

from gream_fast import GreamError
from gream_fast.index import PrefixTrie, SemanticIndex, sid_token


def random_codes(n, levels, k, seed=0):
    return np.random.default_rng(seed).integers(0, k, (n, levels))


def test_collision_level_is_rank_in_group():
    codes = np.array([[1, 2], [0, 0], [1, 2], [3, 3], [1, 2], [0, 0]])
    index = SemanticIndex.from_codes(codes, codebook_size=4)
    assert index.extra.tolist() == [0, 0, 1, -1, 2, 1]  # ranks 1, 2, 3 in item order, 0-based
    assert index.max_len == 3 and index.num_collisions == 5
    assert index.sid(4) == ["<|a_2|>", "<|b_3|>", "<|c_3|>"]
    assert index.sid(3) == ["<|a_4|>", "<|b_4|>"]


def test_collisions_against_a_python_model():
    codes = random_codes(2000, 2, 6, seed=3)  # 36 tuples for 2000 items: every item collides
    index = SemanticIndex.from_codes(codes, codebook_size=128)
    seen = {}
    for i, row in enumerate(map(tuple, codes)):
        seen.setdefault(row, []).append(i)
    for members in seen.values():
        want = list(range(len(members))) if len(members) > 1 else [-1]
        assert index.extra[members].tolist() == want
    # every SID is distinct, so the trie accepts them all
    assert PrefixTrie(index.sid_codes()).num_items == 2000


def test_unique_codes_keep_l_tokens():
    codes = np.array([[0, 1, 2], [2, 1, 0]])
    index = SemanticIndex.from_codes(codes)
    assert index.codebook_size == 3 and index.max_len == 3
    assert index.sid_codes().tolist() == codes.tolist()


def test_too_many_in_a_group_names_the_codes():
    codes = np.array([[1, 1]] * 5 + [[0, 0]])
    with pytest.raises(GreamError, match=r"5 items share the codes \[1, 1\].*codebook size 4"):
        SemanticIndex.from_codes(codes, codebook_size=4)


def test_out_of_range_codes():
    with pytest.raises(GreamError, match=r"codes\[1, 0\] = 7: expected 0..3"):
        SemanticIndex.from_codes(np.array([[0, 0], [7, 1]]), codebook_size=4)


def test_index_json_round_trip(tmp_path):
    index = SemanticIndex.from_codes(random_codes(500, 3, 8, seed=1), codebook_size=8)
    path = tmp_path / "Beauty.index.json"
    index.to_index_json(path)
    data = json.loads(path.read_text())
    assert list(data) == [str(i) for i in range(500)]
    assert data["7"] == index.sid(7)
    assert all(t.startswith("<|") for t in data["0"])
    assert SemanticIndex.from_index_json(path, codebook_size=8) == index


def test_reads_reference_style_file(tmp_path):
    # As the reference writes it: 1-based codes, letters per level, a collision level on some.
    data = {"0": ["<|a_12|>", "<|b_3|>", "<|c_256|>", "<|d_2|>"],
            "1": ["<|a_12|>", "<|b_3|>", "<|c_256|>", "<|d_1|>", "<|e_1|>"],
            "2": ["<|a_12|>", "<|b_3|>", "<|c_256|>", "<|d_1|>", "<|e_2|>"]}
    path = tmp_path / "x.index.json"
    path.write_text(json.dumps(data, indent=2))
    index = SemanticIndex.from_index_json(path)
    assert index.num_levels == 4 and index.codebook_size == 256
    assert index.codes[0].tolist() == [11, 2, 255, 1]
    assert index.extra.tolist() == [-1, 0, 1]
    assert [index.sid(i) for i in range(3)] == [data[str(i)] for i in range(3)]


@pytest.mark.parametrize("data, message", [
    ({"0": ["<|a_1|>"], "2": ["<|a_2|>"]}, r"item id '2': expected ids 0..1, one per item \(item \"1\""),
    ({"0": ["<|a_1|>", "<|c_1|>"]}, r"item \"0\", token 1: \"<\|c_1\|>\" is not '<\|b_N\|>'"),
    ({"0": ["<|a_0|>"]}, "with N in 1..65536"),
    ({"0": []}, "expected a list of 1 to 25 tokens"),
    ({"0": ["<|a_1|>"], "1": ["<|a_1|>", "<|b_1|>", "<|c_1|>"]}, r"item \"1\" has 3 tokens; expected 1"),
    ({"0": ["<|a_1|>", "<|b_2|>"], "1": ["<|a_1|>", "<|b_2|>"]}, "items 0 and 1 have the same SID"),
    ([1, 2], "expected a non-empty object"),
    ({"0": ["<|a_1|>", "<|b_1|>"], "1": ["<|a_1|>", "<|b_1|>", "<|c_1|>"]},
     "items 0 and 1 share the codes .* item 0 has no collision level"),
    ({"0": ["<|a_1|>"], "\u00b2": ["<|a_2|>"]}, "expected ids 0..1"),
    ({"0": [f"<|{chr(97 + j)}_1|>" for j in range(26)]}, "expected a list of 1 to 25 tokens"),
    ({"0": ["<|a_99999999999999999999999|>"]}, "with N in 1..65536"),
])
def test_bad_index_json(tmp_path, data, message):
    path = tmp_path / "bad.index.json"
    path.write_text(json.dumps(data))
    with pytest.raises(GreamError, match=message):
        SemanticIndex.from_index_json(path)


def test_unreadable_path(tmp_path):
    with pytest.raises(GreamError, match="cannot read"):
        SemanticIndex.from_index_json(tmp_path)
    with pytest.raises(GreamError, match="cannot read"):
        SemanticIndex.from_index_json(tmp_path / "missing.index.json")


def test_bad_json_syntax(tmp_path):
    path = tmp_path / "broken.index.json"
    path.write_text('{"0": ["<|a_1|>"')
    with pytest.raises(GreamError, match="broken.index.json: not valid JSON"):
        SemanticIndex.from_index_json(path)


def test_codebook_too_small_for_file(tmp_path):
    path = tmp_path / "x.index.json"
    path.write_text(json.dumps({"0": ["<|a_9|>"]}))
    with pytest.raises(GreamError, match=r"x.index.json: item \"0\", token 0: \"<\|a_9\|>\": "
                                         r"expected '<\|a_N\|>' with N in 1..4"):
        SemanticIndex.from_index_json(path, codebook_size=4)


def test_save_load(tmp_path):
    index = SemanticIndex.from_codes(random_codes(300, 4, 16, seed=2), codebook_size=16)
    index.save(tmp_path / "index.safetensors")
    assert SemanticIndex.load(tmp_path / "index.safetensors") == index


def test_token_strings_cover_every_level_and_code():
    index = SemanticIndex.from_codes(random_codes(10, 2, 3), codebook_size=3)
    strings = index.token_strings()
    assert len(strings) == len(set(strings)) == 3 * 3
    assert strings[0] == sid_token(0, 0) == "<|a_1|>" and strings[-1] == "<|c_3|>"
