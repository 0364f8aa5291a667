"""Constrained sampling for SRPO rollouts: n responses per prompt, every one a real item.
Direct mode below; reasoning mode (free text, the answer marker, then the SID) in
_sample_reasoning, on generate.reasoning's loop.

The n samples of a prompt share its prefill and its prompt KV (rows_per_prompt = n in the
runner). Each step samples from the node's children, renormalised over them with the
temperature and nucleus top_p (sample_children); the reported log-prob of a token is the
policy's own, log-softmax at temperature 1 over the whole vocabulary (score="full") or over
the level's SID tokens (score="sid"), the quantity the SRPO loss recomputes; or, with
logprob_temperature = the sampling temperature, log-softmax of logits / temperature (what
TRL's GRPOTrainer recomputes). EOS after a complete SID is forced and gets its log-prob like
any token (0 under score="sid").
"""
import functools
from dataclasses import dataclass, fields

import torch

from gream_fast.errors import InvalidInputError
from gream_fast.generate.beam import step_candidates
from gream_fast.generate.constraint import SIDConstraint
from gream_fast.generate.recommend import encode_prompts
from gream_fast.kernels.trie_logits import sample_children
from gream_fast.model.runner import make_runner


@dataclass
class Rollouts:
    tokens: torch.Tensor  # [B * n, T] int64 response tokens (SID + EOS), pad_id after the end
    logprobs: torch.Tensor  # [B * n, T] float32 per-token log-probs of the sampling policy
    mask: torch.Tensor  # [B * n, T] bool, True on response tokens
    items: torch.Tensor  # [B * n] int64 the item each response names
    prompt: torch.Tensor  # [B * n] int64 prompt index of each row (groups are contiguous)
    # reasoning mode only (None in direct mode):
    sid_start: torch.Tensor | None = None  # [B * n] int64 where the SID starts (after the marker)
    forced: torch.Tensor | None = None  # [B * n] bool: the think budget ran out, marker forced


def _under_inference_mode(fn):
    """Run fn under torch.inference_mode (no autograd bookkeeping: ~10% of a CPU decode
    step's op overhead) and give back its Rollouts as ordinary tensors (clones made outside
    the mode: a caller may change them in place or train on them)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return Rollouts(**{f.name: None if getattr(out, f.name) is None else
                           getattr(out, f.name).clone() for f in fields(out)})
    return run


@_under_inference_mode
def sample(model, prompts, index, tokenizer=None, n: int = 10, temperature: float = 1.0,
           top_p: float = 1.0, mode: str = "direct", score: str = "full", seed: int = 0,
           pad_id: int | None = None, runner=None, think_budget: int = 512,
           answer: str = "<answer>", answer_end: str = "</answer>", answer_ids=None,
           stop_ids=None, logprob_temperature: float = 1.0) -> Rollouts:
    """n trie-constrained samples per prompt. Direct mode: the response is the SID + EOS.
    Reasoning mode: free text until the answer marker, then the SID + the end token (see
    _sample_reasoning). Seeded: the same seed gives the same rollouts on the same device.
    Runs under torch.inference_mode and returns ordinary tensors."""
    if mode not in ("direct", "reasoning"):
        raise InvalidInputError(f"mode: expected 'direct' or 'reasoning', got {mode!r}")
    if n < 1:
        raise InvalidInputError(f"n: expected >= 1, got {n}")
    if not logprob_temperature > 0:
        raise InvalidInputError(f"logprob_temperature: expected a positive number, got "
                                f"{logprob_temperature!r}")
    runner = runner or make_runner(model)
    if mode == "reasoning":
        return _sample_reasoning(runner, prompts, index, tokenizer, n, temperature, top_p, score,
                                 seed, pad_id, think_budget, answer, answer_end, answer_ids,
                                 stop_ids, logprob_temperature)
    constraint = index if isinstance(index, SIDConstraint) else SIDConstraint(
        index, tokenizer, device=runner.device)
    prompts = encode_prompts(tokenizer, prompts)
    dev = runner.device
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    b, steps = len(prompts), constraint.max_len
    rows = b * n
    pad = constraint.eos_token_id if pad_id is None else pad_id
    hidden, state = runner.prefill(prompts, n, steps)
    hidden = hidden.repeat_interleave(n, 0)  # the n samples of a prompt start from its state
    nodes = torch.zeros(rows, dtype=torch.int32, device=dev)
    tokens = torch.full((rows, steps), pad, dtype=torch.int64, device=dev)
    logprobs = torch.zeros(rows, steps, device=dev)
    mask = torch.zeros(rows, steps, dtype=torch.bool, device=dev)
    for t in range(steps):
        live = torch.nonzero(nodes >= 0).flatten()
        s, tok, child = step_candidates(runner, hidden[live], nodes[live], constraint, t,
                                        constraint.max_children, score, logprob_temperature)
        _, tok, child, lp = sample_children(s, tok, child, temperature / logprob_temperature,
                                            top_p, generator=gen)
        tokens[live, t], logprobs[live, t], mask[live, t] = tok, lp, True
        ended = tok == constraint.eos_token_id
        nodes[live] = torch.where(ended, -1, child.to(nodes.dtype))
        if t == steps - 1 or not bool((nodes >= 0).any()):
            break
        hidden = runner.decode(torch.where(nodes >= 0, tokens[:, t], pad), state)
    ends = mask.sum(1) - 1
    items = constraint.trie.lookup(
        torch.where(mask, tokens, -1).cpu().numpy())
    items = torch.as_tensor(items, device=dev).long()
    if bool((items < 0).any()) or bool((tokens[torch.arange(rows), ends] != constraint.eos_token_id).any()):
        raise RuntimeError("a sampled response is not a complete item (cannot happen)")
    prompt = torch.arange(b, device=dev).repeat_interleave(n)
    return Rollouts(tokens, logprobs, mask, items, prompt)


def _sample_reasoning(runner, prompts, index, tokenizer, n, temperature, top_p, score, seed,
                      pad_id, think_budget, answer, answer_end, answer_ids, stop_ids,
                      logprob_temperature) -> Rollouts:
    """Reasoning-mode rollouts (generate.reasoning.reason_rows): per row, free text sampled at
    temperature / top_p until the marker (`answer`, found in the decoded text with a
    tokenizer, else the ids answer_ids; forced when think_budget runs out; a stop token,
    stop_ids or the tokenizer's EOS, is replaced by it), then a SID sampled under the trie,
    then the end token (`answer_end`'s first token: the constraint's EOS). Log-probs: the
    policy's at logprob_temperature, full vocabulary for the text and the marker, `score` for
    the SID and the end token."""
    from gream_fast.generate.reasoning import answer_constraint, reason_rows

    if think_budget < 0:
        raise InvalidInputError(f"think_budget: expected >= 0, got {think_budget}")
    answer_ids, constraint = answer_constraint(index, tokenizer, runner.device, answer,
                                               answer_end, answer_ids,
                                               caller="sample(mode='reasoning')")
    if stop_ids is None:
        stop_ids = getattr(tokenizer, "eos_token_id", None)
    prompts = encode_prompts(tokenizer, prompts)
    res = reason_rows(runner, prompts, answer_ids, think_budget, temperature, top_p, stop_ids,
                      seed, tokenizer, answer if tokenizer is not None else None, n, constraint,
                      score, logprob_temperature,
                      pad_id=constraint.eos_token_id if pad_id is None else pad_id)
    mask = torch.arange(res.tokens.shape[1], device=res.tokens.device) < res.lengths[:, None]
    if bool((res.items < 0).any()):
        raise RuntimeError("a sampled response names no item (cannot happen)")
    return Rollouts(res.tokens, res.logprobs, mask, res.items,
                    torch.arange(len(prompts), device=runner.device).repeat_interleave(n),
                    res.sid_start, res.forced)
