import numpy as np
import pytest
import torch

from gream_fast import GreamError
from gream_fast.index import PrefixTrie, SemanticIndex
from gream_fast.train.rewards import sid_reward


@pytest.fixture(scope="module")
def index_and_trie():
    rng = np.random.default_rng(0)
    index = SemanticIndex.from_codes(rng.integers(0, 4, (600, 4)), codebook_size=32)
    seqs = index.sid_codes() + np.where(index.sid_codes() >= 0, 1000 + np.arange(index.max_len) * 32, 0)
    return index, seqs, PrefixTrie(seqs)


def test_levels_of_the_residual_sensitive_reward(index_and_trie):
    index, seqs, trie = index_and_trie
    rng = np.random.default_rng(1)
    targets = rng.integers(0, len(seqs), 400)
    pred = seqs[targets].copy()
    # corrupt a random suffix of each prediction, from position `cut` on (cut = width: exact)
    cuts = rng.integers(0, seqs.shape[1] + 1, len(targets))
    for row, cut in zip(pred, cuts):
        row[cut:] = np.where(row[cut:] >= 0, row[cut:] + 7, -1)
    reward, match = sid_reward(pred, targets, trie)
    assert reward.dtype == np.float32 and match.dtype == np.int32
    for p, t, r, m in zip(pred, targets, reward, match):
        l = 0
        while l < seqs.shape[1] and p[l] == seqs[t][l] and p[l] >= 0:
            l += 1
        assert m == l
        want = 1.0 if np.array_equal(p, seqs[t]) else [0.0, 0.5, 0.707, 0.866, 0.95][min(l, 4)]
        assert r == pytest.approx(want)
    assert (reward == 1.0).any() and (reward == 0.0).any() and (reward == 0.95).any()


def test_four_matching_codes_but_wrong_collision_token_is_not_exact(index_and_trie):
    index, seqs, trie = index_and_trie
    a = int(np.flatnonzero(index.extra == 0)[0])
    b = int(np.flatnonzero((index.extra == 1) & (index.codes == index.codes[a]).all(1))[0])
    reward, match = sid_reward(seqs[[b]], np.array([a]), trie)
    assert match.tolist() == [4] and reward.tolist() == [pytest.approx(0.95)]
    # a prediction that stops early (padding) is not the item either
    short = seqs[[a]].copy()
    short[0, 4:] = -1
    reward, match = sid_reward(short, np.array([a]), trie)
    assert match.tolist() == [4] and reward.tolist() == [pytest.approx(0.95)]


def test_torch_tensors_in_and_out(index_and_trie):
    _, seqs, trie = index_and_trie
    reward, match = sid_reward(torch.from_numpy(seqs[:5]), torch.arange(5), trie)
    assert isinstance(reward, torch.Tensor) and reward.tolist() == [1.0] * 5
    assert match.tolist() == [int((seqs[i] >= 0).sum()) for i in range(5)]


def test_bad_input(index_and_trie):
    _, seqs, trie = index_and_trie
    with pytest.raises(GreamError, match="target_items: expected 3 items"):
        sid_reward(seqs[:3], np.array([0, 1]), trie)
    with pytest.raises(GreamError, match=r"items\[1\] = 100000 is not an item id"):
        sid_reward(seqs[:2], np.array([0, 100000]), trie)


def test_eos_ends_a_prediction(index_and_trie):
    _, seqs, trie = index_and_trie
    eos = 99
    row = seqs[[3]].copy()
    n = int((row[0] >= 0).sum())
    gen = np.full((1, n + 3), -1)
    gen[0, :n] = row[0, :n]
    gen[0, n] = eos
    gen[0, n + 1] = 1000  # whatever follows EOS is ignored
    assert sid_reward(gen, np.array([3]), trie, eos_token_id=eos)[0].tolist() == [1.0]
    assert sid_reward(gen, np.array([3]), trie)[0].tolist() != [1.0]  # EOS read as a token
    early = gen.copy()
    early[0, 2] = eos  # EOS after two tokens: a partial match
    reward, match = sid_reward(early, np.array([3]), trie, eos_token_id=eos)
    assert match.tolist() == [2] and reward.tolist() == [pytest.approx(0.707)]
