"""The reasoning-mode reward gate (train.rewards.gated_sid_reward, answer_start): random
responses built from random pieces (think markers present or not, in order or not, answers
right, partial, broken or missing), checked against a plain per-row reading of METHOD.md."""
import numpy as np
import torch

from gream_fast.index import PrefixTrie, SemanticIndex
from gream_fast.train.rewards import ThinkFormat, answer_start, gated_sid_reward, sid_reward

FMT = ThinkFormat(answer=[8, 9], think_open=[5, 6], think_close=[7, 5, 6])
END, TEXT = 10, (11, 100)


def find(seq, ids, lo=0, hi=None):
    hi = len(seq) if hi is None else hi
    return next((p for p in range(lo, hi - len(ids) + 1) if seq[p:p + len(ids)] == ids), -1)


def response(rng, sids):
    """A random response and the position after its marker (-1 without one)."""
    text = lambda: rng.integers(*TEXT, rng.integers(0, 4)).tolist()  # noqa: E731
    parts = [text()]
    kind = rng.integers(5)  # 0: well formed; 1: no open; 2: no close; 3: close first; 4: none
    if kind in (0, 2):
        parts += [FMT.think_open, text()]
    if kind in (0, 1):
        parts += [FMT.think_close, text()]
    if kind == 3:
        parts += [FMT.think_close, text(), FMT.think_open, text()]
    seq = sum(parts, [])
    if rng.random() < 0.15:
        return seq, -1  # never answered
    seq += FMT.answer
    start = len(seq)
    sid = list(sids[rng.integers(len(sids))])
    sid = [t for t in sid if t >= 0]
    how = rng.integers(6)
    if how == 1:
        sid[rng.integers(len(sid)):] = []  # cut short (maybe empty)
    elif how == 2:
        sid[rng.integers(len(sid))] = int(rng.integers(*TEXT))  # a text token in the answer
    elif how == 3:
        sid[-1] += 1 if sid[-1] % 32 < 3 else -1  # a wrong last code
    seq += sid + ([END] if rng.random() < 0.9 else []) + text()
    return seq, start


def test_gate_matches_a_plain_reading():
    rng = np.random.default_rng(0)
    index = SemanticIndex.from_codes(rng.integers(0, 4, (80, 3)), codebook_size=32)
    codes = index.sid_codes()
    sids = np.where(codes >= 0, codes + 1000 + 32 * np.arange(codes.shape[1]), -1)
    trie = PrefixTrie(sids)
    sid_tokens = 1000 + np.arange(32 * codes.shape[1])
    rows = [response(rng, sids) for _ in range(300)]
    width = max(len(s) for s, _ in rows)
    tokens = np.full((len(rows), width), -1)
    for r, (s, _) in enumerate(rows):
        tokens[r, :len(s)] = s
    starts = np.array([st for _, st in rows])
    targets = rng.integers(0, len(sids), len(rows))
    for r in range(0, len(rows), 3):  # a third aim at the item answered, if any: exact rewards
        seq, st = rows[r]
        if st >= 0 and END in seq[st:] and seq.index(END, st) > st:
            targets[r] = max(int(trie.lookup(np.array([seq[st:seq.index(END, st)]]))[0]), 0)
    assert np.array_equal(answer_start(tokens, FMT.answer), starts)
    reward, match, ok = gated_sid_reward(torch.as_tensor(tokens), torch.as_tensor(starts),
                                         targets, trie, END, FMT, sid_tokens)
    assert isinstance(reward, torch.Tensor) and reward.dtype == torch.float32
    for r, ((seq, st), t) in enumerate(zip(rows, targets)):
        bound = st if st >= 0 else len(seq)
        o = find(seq, FMT.think_open, 0, bound)
        think = o >= 0 and find(seq, FMT.think_close, o + len(FMT.think_open), bound) >= 0
        end = seq.index(END, st) if st >= 0 and END in seq[st:] else -1
        answer = seq[st:end] if end > st else []
        good = think and bool(answer) and all(a in set(sid_tokens.tolist()) for a in answer)
        assert bool(ok[r]) == good, (seq, st)
        if good:
            want_r, want_m = sid_reward(np.array([answer]), np.array([t]), trie)
            assert reward[r] == want_r[0] and match[r] == want_m[0]
        else:
            assert reward[r] == 0 and match[r] == 0
    assert ok.any() and (~ok).any() and (reward == 1.0).any()
    assert ((reward > 0) & (reward < 1)).any()
