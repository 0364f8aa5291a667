"""The library-free core under the adapters (trl.py, verl.py, vllm.py): pure lists, arrays and
tensors in and out, so the tests run it without TRL, verl or vLLM.

- check_tokenizer: a constraint and a tokenizer must agree on the SID token ids and on the end
  token, or every reward and mask an adapter computes is silently wrong.
- completion_rewards: the residual-sensitive reward of generated completions from their token
  ids (direct mode), or the gated reward of think-then-answer completions (reasoning mode),
  exactly as our own SRPO step computes them (train.srpo._rollout_rewards).
- prompt_runs: a trainer's prompt list cut into runs of equal consecutive prompts, the groups
  a rollout can serve from one prefill.
"""
from dataclasses import dataclass

import numpy as np

from gream_fast.errors import InvalidInputError
from gream_fast.generate.constraint import SIDConstraint
from gream_fast.index.tokens import sid_token_table
from gream_fast.train.rewards import ThinkFormat, answer_start, gated_sid_reward, sid_reward
from gream_fast.train.srpo import sid_trie

MODES = ("direct", "reasoning")
ANSWER_END = "</answer>"  # reasoning mode: its first token closes the SID


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidInputError(f"mode: expected 'direct' or 'reasoning', got {mode!r}")
    return mode


def end_tokens(tokenizer, mode: str = "direct") -> set:
    """The token ids that may close a SID: in direct mode the tokenizer's EOS and its chat
    template's end of turn (what SFT'd models emit, e.g. <|im_end|>); in reasoning mode the
    first token of "</answer>"."""
    if check_mode(mode) == "reasoning":
        return {int(tokenizer(ANSWER_END, add_special_tokens=False)["input_ids"][0])}
    from gream_fast.tasks.chat import ChatEncoder

    eos = tokenizer.eos_token_id
    ends = set() if eos is None else {int(eos)} if isinstance(eos, int) else set(map(int, eos))
    eot = ChatEncoder(tokenizer).eot_id if getattr(tokenizer, "chat_template", None) else None
    return ends | ({int(eot)} if eot is not None else set())


def check_tokenizer(constraint: SIDConstraint, tokenizer, *, mode: str = "direct",
                    who: str = "adapter") -> None:
    """Raise InvalidInputError unless `tokenizer` maps every SID string of the constraint's
    index to the constraint's token id, and the constraint closes SIDs with one of
    end_tokens(tokenizer, mode)."""
    if not isinstance(constraint, SIDConstraint):
        raise InvalidInputError(f"{who}: expected an SIDConstraint, got {type(constraint).__name__}")
    table = sid_token_table(tokenizer, constraint.index)
    if not np.array_equal(table, constraint.token_table):
        lvl, code = np.argwhere(table != constraint.token_table)[0]
        s = constraint.index.token_strings()[lvl * constraint.index.codebook_size + code]
        raise InvalidInputError(
            f"{who}: the constraint and the tokenizer disagree on SID token {s!r}: the constraint "
            f"has id {constraint.token_table[lvl, code]}, the tokenizer {table[lvl, code]} (build "
            "the SIDConstraint from this tokenizer)")
    ends = end_tokens(tokenizer, mode)
    if constraint.eos_token_id not in ends:
        want = (f"the first token of {ANSWER_END!r}" if mode == "reasoning"
                else "the tokenizer's EOS or its chat template's end of turn")
        raise InvalidInputError(f"{who}: the constraint ends SIDs with token "
                                f"{constraint.eos_token_id}, {mode} mode expects {want} "
                                f"({', '.join(map(str, sorted(ends))) or 'none'})")


def pad_rows(seqs, pad: int = -1) -> np.ndarray:
    """Lists of token ids (lists, arrays or tensors) -> int64 [R, W], `pad` after each row."""
    rows = [np.asarray(s.tolist() if hasattr(s, "tolist") else s, dtype=np.int64).ravel()
            for s in seqs]
    out = np.full((len(rows), max((len(r) for r in rows), default=0)), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def as_targets(targets, count: int, num_items: int, field: str = "target") -> np.ndarray:
    """Item ids [count] from a list of ints (or int-valued strings), each in 0..num_items-1."""
    if targets is None:
        raise InvalidInputError(f"{field}: missing; the dataset needs a column {field!r} with "
                                "each prompt's target item id")
    out = np.empty(len(targets), dtype=np.int64)
    for i, t in enumerate(targets):
        try:
            v = int(t)
            if v != t and not isinstance(t, str):
                raise ValueError
        except (TypeError, ValueError):
            raise InvalidInputError(f"{field}[{i}]: expected an item id (an integer), got {t!r}") \
                from None
        out[i] = v
    if len(out) != count:
        raise InvalidInputError(f"{field}: expected {count} values (one per completion), got "
                                f"{len(out)}")
    bad = np.flatnonzero((out < 0) | (out >= num_items))
    if len(bad):
        raise InvalidInputError(f"{field}[{bad[0]}] = {out[bad[0]]}: expected an item id in "
                                f"0..{num_items - 1} (the index has {num_items} items)")
    return out


@dataclass
class CompletionRewards:
    reward: np.ndarray  # float32 [R]: the residual-sensitive reward (0 where not valid)
    match: np.ndarray  # int [R]: leading SID tokens shared with the target's SID
    valid: np.ndarray  # bool [R]: a SID (direct) / the think-then-answer format (reasoning)
    sid_start: np.ndarray  # int64 [R]: where the SID starts in each completion (-1: none)


def completion_rewards(completion_ids, targets, constraint: SIDConstraint, *,
                       mode: str = "direct", fmt: ThinkFormat | None = None, sid_start=None,
                       on_invalid: str = "raise") -> CompletionRewards:
    """Rewards of generated completions (token-id lists) for their target items.

    direct: a completion is SID tokens closed by the constraint's EOS (trailing padding after
    it is ignored); the reward is 1.0 for the exact item, else by shared prefix (train.rewards).
    A completion with any other token before the EOS, or none at all, is not a SID: with
    on_invalid="raise" (the default: trie-constrained rollouts never produce one, so it means
    the rollouts or the constraint are not what the trainer uses) an InvalidInputError names
    the completion, position and token; with "zero" it scores 0 (unconstrained generation).
    reasoning: the gated reward (0 unless a think block precedes an answer of SID tokens closed
    by the end token); sid_start gives where each answer starts (our rollouts report it), else
    it is found after the first fmt.answer marker in the ids. A malformed completion is the
    method's 0 here, never an error."""
    check_mode(mode)
    if on_invalid not in ("raise", "zero"):
        raise InvalidInputError(f"on_invalid: expected 'raise' or 'zero', got {on_invalid!r}")
    tokens = pad_rows(completion_ids)
    R = len(tokens)
    tgt = as_targets(targets, R, constraint.num_items)
    trie = sid_trie(constraint)
    eos = constraint.eos_token_id
    if mode == "reasoning":
        if fmt is None:
            raise InvalidInputError("completion_rewards: reasoning mode needs fmt, the "
                                    "ThinkFormat of the tokenizer's markers")
        start = (answer_start(tokens, fmt.answer) if sid_start is None
                 else np.asarray(sid_start, dtype=np.int64).ravel())
        if len(start) != R:
            raise InvalidInputError(f"sid_start: expected {R} positions, got {len(start)}")
        reward, match, ok = gated_sid_reward(tokens, start, tgt, trie, eos, fmt,
                                             constraint.token_table)
        return CompletionRewards(reward, match, ok, np.where(ok, start, -1))
    pos = np.arange(tokens.shape[1])[None]
    has_eos = (tokens == eos).any(1)
    end = np.where(has_eos, (tokens == eos).argmax(1), (tokens >= 0).sum(1))
    body = pos < end[:, None]
    is_sid = np.isin(tokens, constraint.token_table.ravel())
    bad = (body & ~is_sid).any(1) | (end == 0)
    if bad.any() and on_invalid == "raise":
        i = int(np.flatnonzero(bad)[0])
        p = int(np.argmax(body[i] & ~is_sid[i])) if end[i] else 0
        got = (f"token {tokens[i, p]} at position {p}" if end[i]
               else "no SID token before the end" if len(completion_ids[i]) else "nothing")
        raise InvalidInputError(
            f"completion {i}: expected SID tokens of the index closed by EOS ({eos}), got {got} "
            "(trie-constrained rollouts never produce this: is the trainer using gream-fast's "
            "rollouts with this constraint? on_invalid='zero' scores such completions 0)")
    pred = np.where(body & ~bad[:, None], tokens, -1)
    reward, match = sid_reward(pred, tgt, trie)
    reward = np.where(bad, np.float32(0), reward).astype(np.float32)
    return CompletionRewards(reward, np.where(bad, 0, match), ~bad,
                             np.where(bad, -1, 0).astype(np.int64))


def prompt_runs(prompts) -> list:
    """[(start, length)] of the runs of equal consecutive prompts: a trainer that repeats each
    prompt n times in a row hands a process runs of n (or, where a group is split across
    processes, shorter runs at the ends); each run shares one prefill. Equality is by value
    (text, token lists or chat messages alike)."""
    runs = []
    for i, p in enumerate(prompts):
        if runs and prompts[runs[-1][0]] == p:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return [tuple(r) for r in runs]
