"""Reasoning mode (METHOD.md section 6): think freely, then answer with a real item.

Phase 1 writes each prompt's reasoning on the runner: free text (sampled with temperature and
top_p, or greedy at temperature 0) until the answer marker (`<answer>`) appears, or until the
think budget runs out, when the marker is forced. Rows that finish leave the batch, so the
long ones run at full speed. Phase 2 ranks items by trie-constrained beam search after
prompt + reasoning + marker (the answer is always a real item, **beyond** the reference's
unconstrained answer), each SID closed by `</answer>`. One reasoning chain per prompt: the
beams branch at the answer, where the ranking is decided. Where `</answer>` is several
tokens, its first token closes the SID.
"""
from dataclasses import dataclass

import torch

from gream_fast.errors import InvalidInputError
from gream_fast.generate.beam import beam_search
from gream_fast.generate.constraint import SIDConstraint
from gream_fast.generate.recommend import encode_prompts
from gream_fast.model.runner import make_runner


@dataclass
class ReasoningResult:
    reasoning: list  # per prompt: generated token ids, ending with the answer marker
    texts: list  # the same decoded (None without a tokenizer)
    forced: torch.Tensor  # [B] bool: the think budget ran out and the marker was forced
    items: torch.Tensor  # [B, top_k]
    scores: torch.Tensor  # [B, top_k]


def sample_logits(logits, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1:
        p, order = probs.sort(-1, descending=True)
        before = p.cumsum(-1) - p
        p = torch.where(before < top_p, p, 0.0)
        return order.gather(1, torch.multinomial(p, 1, generator=generator)).squeeze(1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def think(runner, prompts, answer_ids, budget: int, temperature: float = 0.7,
          top_p: float = 0.9, eos_token_id: int | None = None, seed: int = 0,
          tokenizer=None, answer: str | None = None):
    """Phase 1: reasoning tokens per prompt (ending with the marker) and whether forced. The
    marker is found as the token ids answer_ids, or, given a tokenizer and the `answer` text,
    in the decoded text (BPE tokenizes " <answer>" in running text unlike "<answer>" alone)."""
    answer_ids = [int(t) for t in answer_ids]
    if not answer_ids or budget < 0:
        raise InvalidInputError("think: answer_ids must be non-empty and budget >= 0")
    b, m = len(prompts), len(answer_ids)
    out = [[] for _ in range(b)]
    forced = torch.zeros(b, dtype=torch.bool)
    gen = torch.Generator(device=runner.device).manual_seed(int(seed))
    if budget == 0:
        return [list(answer_ids) for _ in range(b)], forced | True
    hidden, state = runner.prefill(prompts, 1, budget)
    rows = torch.arange(b)  # the prompt of each row still in the batch
    marker = torch.tensor(answer_ids, device=runner.device)
    tail = torch.full((b, m), -1, dtype=torch.int64, device=runner.device)
    for step in range(budget):
        tok = sample_logits(runner.logits(hidden), temperature, top_p, gen)
        tail = torch.cat([tail[:, 1:], tok[:, None]], 1)
        for r, t in zip(rows.tolist(), tok.tolist()):
            out[r].append(t)
        if tokenizer is not None and answer is not None:
            texts = tokenizer.batch_decode([out[r][-2 * m - 2:] for r in rows.tolist()])
            done = torch.tensor([answer in t for t in texts], device=tok.device)
        else:
            done = (tail == marker).all(1)
        if eos_token_id is not None:  # ended without an answer: answer now
            done |= tok == eos_token_id
        if step == budget - 1:
            break
        if bool(done.any()):
            keep = torch.nonzero(~done).flatten()
            if keep.numel() == 0:
                break
            state.select(keep)
            rows, hidden, tok, tail = rows[keep.cpu()], hidden[keep], tok[keep], tail[keep]
        hidden = runner.decode(tok, state)
    for r in range(b):
        text_done = (tokenizer is not None and answer is not None
                     and answer in tokenizer.decode(out[r][-2 * m - 2:]))
        if out[r][-m:] != answer_ids and not text_done:
            if eos_token_id is not None and out[r] and out[r][-1] == eos_token_id:
                out[r].pop()
            else:
                forced[r] = True
            out[r].extend(answer_ids)
    return out, forced


def reason_and_recommend(model, tokenizer, index, prompts, think_budget: int = 512,
                         temperature: float = 0.7, top_p: float = 0.9, num_beams: int = 10,
                         top_k: int = 10, score: str = "full", seed: int = 0,
                         answer: str = "<answer>", answer_end: str = "</answer>",
                         answer_ids=None, end_token_id: int | None = None,
                         runner=None) -> ReasoningResult:
    """Reasoning, then the ranked items. With a tokenizer, the marker and end token come from
    the `answer` / `answer_end` strings; without one, pass answer_ids and end_token_id."""
    runner = runner or make_runner(model)
    prompts = encode_prompts(tokenizer, prompts)
    if answer_ids is None:
        if tokenizer is None:
            raise InvalidInputError("reason_and_recommend: pass a tokenizer or answer_ids")
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if end_token_id is None and tokenizer is not None:
        # the SID is closed by the end marker's first token (all of it when it is one token)
        end_token_id = tokenizer(answer_end, add_special_tokens=False)["input_ids"][0]
    if isinstance(index, SIDConstraint):
        constraint = index
        if end_token_id is not None and constraint.eos_token_id != end_token_id:
            raise InvalidInputError(f"the constraint ends SIDs with {constraint.eos_token_id}, "
                                    f"reasoning mode needs {end_token_id}")
    else:
        constraint = SIDConstraint(index, tokenizer, eos_token_id=end_token_id,
                                   device=runner.device)
    eos = getattr(tokenizer, "eos_token_id", None)
    reasoning, forced = think(runner, prompts, answer_ids, think_budget, temperature, top_p,
                              eos, seed, tokenizer, answer if tokenizer is not None else None)
    res = beam_search(runner, [p + r for p, r in zip(prompts, reasoning)], constraint,
                      num_beams, top_k, score)
    texts = [tokenizer.decode(r) for r in reasoning] if tokenizer is not None else [None] * len(prompts)
    return ReasoningResult(reasoning, texts, forced, res.items, res.scores)
