"""Residual-sensitive verifiable reward (SRPO, METHOD.md section 5), from token ids.

An exact item earns 1.0; otherwise the reward grows with l, the number of leading SID tokens the
prediction shares with the target: 0, 0.5, 0.707, 0.866 for l = 0..3 and 0.95 for l >= 4.
"""
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
