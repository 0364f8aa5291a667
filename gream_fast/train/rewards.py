"""Residual-sensitive verifiable reward (SRPO, METHOD.md section 5), from token ids.

An exact item earns 1.0; otherwise the reward grows with l, the number of leading SID tokens the
prediction shares with the target: 0, 0.5, 0.707, 0.866 for l = 0..3 and 0.95 for l >= 4.
Reasoning mode gates it (gated_sid_reward): 0 unless the response has a think block and an
answer of SID tokens, both found in the token ids (**beyond** the reference's regexes on text).
"""
from dataclasses import dataclass

import numpy as np

from gream_fast.arrays import as_int_array, like
from gream_fast.errors import InvalidInputError
from gream_fast.index.trie import PrefixTrie

EXACT_REWARD = 1.0
PARTIAL_REWARDS = (0.0, 0.5, 0.707, 0.866, 0.95)  # by matched prefix length l; l >= 4 -> last


def sid_reward(pred_tokens, target_items, trie: PrefixTrie, eos_token_id: int | None = None):
    """Reward per prediction and its match length.

    pred_tokens: int [R, W], predicted SID token ids, -1 padding at the end (a generated
    response may end with eos_token_id: it and what follows count as padding);
    target_items: int [R] item ids. Returns (reward float32 [R], match int32 [R]) where match
    is the number of leading tokens shared with the target's SID; torch tensors on the input's
    device when pred_tokens is a tensor.
    """
    pred = as_int_array(pred_tokens, "pred_tokens", ndim=2)
    if eos_token_id is not None:
        ended = np.cumsum(pred == eos_token_id, axis=1) > 0
        pred = np.where(ended, -1, pred)
    target = as_int_array(target_items, "target_items", ndim=1)
    if len(target) != len(pred):
        raise InvalidInputError(
            f"target_items: expected {len(pred)} items (one per row of pred_tokens), got {len(target)}")
    match = trie.common_prefix(pred, target)
    exact = trie.lookup(pred) == target
    table = np.asarray(PARTIAL_REWARDS, dtype=np.float32)
    reward = np.where(exact, np.float32(EXACT_REWARD), table[np.minimum(match, len(table) - 1)])
    return like(reward.astype(np.float32), pred_tokens), like(match, pred_tokens)


def rank_rewards(exact, n: int):
    """The ranking-aware term of beam groups (after MiniOneRec's ranking reward), [R] float32:
    in a group of n responses ranked best first (beam order) that holds the target item, the
    wrong item at rank i (1-based) loses w_i = (1 / log2(i + 1)) / sum_j 1 / log2(j + 1) (the
    weights of the n ranks sum to 1), so the wrong items the policy ranks highest lose most;
    the target and every response of a group without it get 0. exact: [R] bool, the
    responses that name the target, groups of n contiguous."""
    import torch

    exact = torch.as_tensor(exact).view(-1, n)
    w = 1.0 / torch.log2(torch.arange(2, n + 2, dtype=torch.float32))
    w = w / w.sum()
    hit = exact.any(1, keepdim=True)
    return torch.where(hit & ~exact, -w, 0.0).flatten()


def level_credit(lengths, ends, matches, exact):
    """Per-level credit of direct-mode responses: each token's own reward, [R, W] float32 (W the
    longest response; 0 past a response's end). SID token d (0-based) earns what the prefix up
    to it earns when it matches the target's token d (PARTIAL_REWARDS[d + 1], 1.0 for the last
    token of the exact item) and 0 once the response has gone wrong: a wrong item's later
    tokens are not paid for the cluster its first ones found. The end token earns 1.0 after
    the exact item, else 0.

    lengths [R] tokens per response; ends [R] bool: the response closes with the end token;
    matches [R] leading SID tokens shared with the target; exact [R] bool: the target item."""
    import torch

    lengths, matches = torch.as_tensor(lengths), torch.as_tensor(matches).long()
    ends, exact = torch.as_tensor(ends), torch.as_tensor(exact)
    d = torch.arange(int(lengths.max()) if len(lengths) else 0)[None]
    sid_len = (lengths - ends.long())[:, None]
    table = torch.tensor(PARTIAL_REWARDS)
    credit = torch.where(d < matches[:, None], table[(d + 1).clamp(max=len(table) - 1)], 0.0)
    credit = torch.where(exact[:, None] & (d == sid_len - 1), EXACT_REWARD, credit)
    credit = torch.where(ends[:, None] & (d == sid_len), exact[:, None].float(), credit)
    return torch.where(d < lengths[:, None], credit, 0.0)


@dataclass
class ThinkFormat:
    """Token ids of the reasoning layout's markers (tasks.reason.response)."""
    answer: list  # opens the answer: "<answer>"
    think_open: list  # "<think>"
    think_close: list  # "</think>"
    stop: tuple = ()  # ids that end a turn: sampled while thinking, the marker replaces them

    @classmethod
    def from_tokenizer(cls, tokenizer, answer: str = "<answer>", think_open: str = "<think>",
                       think_close: str = "</think>", stop=None) -> "ThinkFormat":
        """The markers' ids; stop: the turn's end ids (default: the tokenizer's EOS)."""
        def ids(text):
            return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
        if stop is None:
            stop = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
        return cls(ids(answer), ids(think_open), ids(think_close), tuple(int(t) for t in stop))


def _first_at(tokens: np.ndarray, ids, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per row, the first position p with lo <= p and p + len(ids) <= hi where `ids` occurs in
    tokens, else -1."""
    R, W = tokens.shape
    m = len(ids)
    if m == 0 or W < m:
        return np.full(R, -1 if m else 0, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, m, axis=1)  # [R, W - m + 1, m]
    p = np.arange(W - m + 1)
    hit = (windows == np.asarray(ids)).all(2) & (p >= lo[:, None]) & (p + m <= hi[:, None])
    return np.where(hit.any(1), hit.argmax(1), -1)


def answer_start(tokens, answer_ids) -> np.ndarray:
    """Per response (int [R, W]), the position after the first answer marker, else -1."""
    tok = as_int_array(tokens, "tokens", ndim=2)
    at = _first_at(tok, [int(t) for t in answer_ids], np.zeros(len(tok), np.int64),
                   np.full(len(tok), tok.shape[1]))
    return np.where(at >= 0, at + len(answer_ids), -1)


def gated_sid_reward(tokens, sid_start, target_items, trie: PrefixTrie, end_token_id: int,
                     fmt: ThinkFormat, sid_token_ids):
    """The reasoning-mode reward: sid_reward of each response's answer, 0 unless its format is
    right. tokens: int [R, W] response ids (-1 padding at the end); sid_start: int [R], where
    the SID starts (after the answer marker: sampling reports it, answer_start finds it; -1
    when there is none); trie: the items' SID tokens without the end token. The format: a
    think block (fmt.think_open, later fmt.think_close, both before sid_start) and an answer
    of SID tokens (at least one token of sid_token_ids from sid_start, then nothing but SID
    tokens up to end_token_id). Returns (reward float32 [R], match int32 [R], ok bool [R]);
    torch tensors on the input's device when tokens is a tensor."""
    tok = as_int_array(tokens, "tokens", ndim=2)
    start = as_int_array(sid_start, "sid_start", ndim=1)
    R, W = tok.shape
    if len(start) != R:
        raise InvalidInputError(f"sid_start: expected {R} positions (one per row of tokens), got "
                                f"{len(start)}")
    # the answer: sid_start .. the first end token after it, all SID tokens, at least one
    pos = np.arange(W)[None]
    after = (pos >= start[:, None]) & (start[:, None] >= 0)
    end = np.where((after & (tok == int(end_token_id))).any(1),
                   (after & (tok == int(end_token_id))).argmax(1), -1)
    sid = after & (pos < end[:, None])
    is_sid = np.isin(tok, as_int_array(sid_token_ids, "sid_token_ids").ravel())
    answered = (end > start) & (start >= 0) & ~(sid & ~is_sid).any(1)
    # the think block: <think> ... </think>, closed before the answer
    bound = np.where(start >= 0, start, W)
    zero = np.zeros(R, np.int64)
    opened = _first_at(tok, fmt.think_open, zero, bound)
    closed = _first_at(tok, fmt.think_close, opened + len(fmt.think_open), bound)
    ok = answered & (opened >= 0) & (closed >= 0)
    # each answer left-aligned, -1 after it (and for rows without one): what sid_reward compares
    length = np.where(answered, end - start, 0)
    j = np.arange(max(int(length.max(initial=0)), 1))[None]
    at = np.minimum(np.maximum(start, 0)[:, None] + j, W - 1)
    pred = np.where(j < length[:, None], np.take_along_axis(tok, at, 1), -1)
    reward, match = sid_reward(pred, target_items, trie)
    reward = np.where(ok, reward, np.float32(0)).astype(np.float32)
    match = np.where(ok, match, 0).astype(match.dtype)
    return like(reward, tokens), like(match, tokens), like(ok, tokens)
