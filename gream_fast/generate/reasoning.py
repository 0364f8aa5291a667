"""Reasoning mode (METHOD.md section 6): think freely, then answer with a real item.

Phase 1 writes each prompt's reasoning on the runner: free text (sampled with temperature and
top_p, or greedy at temperature 0) until the answer marker (`<answer>`) appears, or until the
think budget runs out, when the marker is forced. Rows that finish leave the batch, so the
long ones run at full speed. Phase 2 ranks items by trie-constrained beam search after
prompt + reasoning + marker (the answer is always a real item, **beyond** the reference's
unconstrained answer), each SID closed by `</answer>`. One reasoning chain per prompt: the
beams branch at the answer, where the ranking is decided. Where `</answer>` is several
tokens, its first token closes the SID.

The loop (reason_rows) also serves SRPO's reasoning rollouts (generate.sample, mode
"reasoning"): n rows per prompt on one prefill, each row going on from its marker to sample a
SID under the trie, every token with the policy's log-prob.
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


THINK, FORCE, ANSWER = 0, 1, 2  # a row's phase: free text, the forced marker, the SID


@dataclass
class ReasonRows:
    tokens: list  # per row: generated ids (reasoning up to the marker; then SID + end token)
    logprobs: list  # per row: the policy's log-prob of each token (with a constraint only)
    forced: list  # per row: the think budget ran out and the marker was forced
    sid_start: list  # per row: index in tokens where the SID starts (-1: no answer phase)
    items: list  # per row: the item its SID names (-1: no answer phase)


def _stops(eos_token_id) -> set:
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id}


def _marker_seen(seqs, answer_ids, tokenizer=None, answer=None) -> list:
    """Per token list: does it end with the marker (as ids, or in the decoded text)?"""
    m = len(answer_ids)
    if tokenizer is not None and answer is not None:
        return [answer in t for t in tokenizer.batch_decode([q[-2 * m - 2:] for q in seqs])]
    return [q[-m:] == answer_ids for q in seqs]


def _answer_step(runner, hidden, nodes, depth, constraint, score, temperature, top_p, gen,
                 logprob_temperature=1.0):
    """One trie-constrained sample per answering row: (token, child node, log-prob)."""
    from gream_fast.generate.beam import step_candidates
    from gream_fast.kernels.trie_logits import sample_children

    tok = torch.empty(len(nodes), dtype=torch.int64, device=nodes.device)
    child, lp = torch.empty_like(nodes), torch.empty(len(nodes), device=nodes.device)
    # score="sid" reads the level's LM-head rows, so rows at different depths go apart
    groups = [None] if score == "full" else sorted(set(depth.tolist()))
    for d in groups:
        rows = torch.arange(len(nodes)) if d is None else torch.nonzero(depth == d).flatten()
        rows = rows.to(nodes.device)
        s, t, c = step_candidates(runner, hidden[rows], nodes[rows], constraint, d or 0,
                                  constraint.max_children, score, logprob_temperature)
        _, t, c, l = sample_children(s, t, c, temperature / logprob_temperature, top_p,
                                     generator=gen)
        tok[rows], child[rows], lp[rows] = t, c.to(child.dtype), l
    return tok, child, lp


@torch.no_grad()
def reason_rows(runner, prompts, answer_ids, budget: int, temperature: float = 0.7,
                top_p: float = 0.9, eos_token_id=None, seed: int = 0, tokenizer=None,
                answer: str | None = None, n: int = 1, constraint=None,
                score: str = "full", logprob_temperature: float = 1.0) -> ReasonRows:
    """The reasoning loop behind think() and reasoning-mode sampling. n rows per prompt share
    its prefill and prompt KV; each writes free text (sample_logits at temperature / top_p)
    until the marker (see think). Rows that finish leave the batch. Without a constraint a row
    stops at the marker, or at an EOS (eos_token_id: an id or ids), or when the budget runs
    out (think() appends the marker). With one (an SIDConstraint whose EOS is the answer's end
    token), a row goes on: a sampled EOS is replaced by the marker, an exhausted budget forces
    the marker, the marker tokens are fed, then a SID is sampled under the trie
    (sample_children at temperature / top_p) and closed by the end token; every token gets
    the policy's log-prob (at logprob_temperature; full vocabulary for text and the marker,
    `score` for the SID as in direct sampling)."""
    answer_ids = [int(t) for t in answer_ids]
    m, dev, stops = len(answer_ids), runner.device, _stops(eos_token_id)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    R = len(prompts) * n
    res = ReasonRows([[] for _ in range(R)], [[] for _ in range(R)], [False] * R, [-1] * R,
                     [-1] * R)
    capacity = budget + (m + constraint.max_len if constraint is not None else 0)
    hidden, state = runner.prefill(prompts, n, max(capacity, 1))
    hidden = hidden.repeat_interleave(n, 0)
    rows = list(range(R))  # the row of each live row
    phase = torch.full((R,), THINK)  # host state of the live rows
    fpos, depth = torch.zeros(R, dtype=torch.int64), torch.zeros(R, dtype=torch.int64)
    nodes = torch.zeros(R, dtype=torch.int32, device=dev)
    marker = torch.tensor(answer_ids, device=dev)
    stop_ids = torch.tensor(sorted(stops), dtype=torch.int64, device=dev)
    step = 0
    while True:
        if step == budget and constraint is not None:  # the budget is spent: answer now
            for j in torch.nonzero(phase == THINK).flatten().tolist():
                res.forced[rows[j]] = True
            phase[phase == THINK] = FORCE
        logits = runner.logits(hidden)
        tok = torch.zeros(len(rows), dtype=torch.int64, device=dev)
        thinking = torch.nonzero(phase == THINK).flatten()
        if len(thinking) == len(rows):  # (all rows: the same draw as over the whole batch)
            tok = sample_logits(logits, temperature, top_p, gen)
        elif len(thinking):
            tok[thinking.to(dev)] = sample_logits(logits[thinking.to(dev)], temperature, top_p,
                                                  gen)
        if constraint is not None:
            if stops and len(thinking):  # ended without an answer: the marker replaces EOS
                ended = torch.isin(tok, stop_ids).cpu() & (phase == THINK)
                phase[ended], fpos[ended] = FORCE, 0
            forcing = torch.nonzero(phase == FORCE).flatten()
            tok[forcing.to(dev)] = marker[fpos[forcing].to(dev)]
            lp = torch.log_softmax(logits / logprob_temperature, -1).gather(
                1, tok[:, None]).squeeze(1)
            answering = torch.nonzero(phase == ANSWER).flatten()
            if len(answering):
                a = answering.to(dev)
                t, c, l = _answer_step(runner, hidden[a], nodes[a], depth[answering],
                                       constraint, score, temperature, top_p, gen,
                                       logprob_temperature)
                tok[a], lp[a], nodes[a] = t, l, c
            lps = lp.tolist()
        toks = tok.tolist()
        done = torch.zeros(len(rows), dtype=torch.bool)
        for j, r in enumerate(rows):
            res.tokens[r].append(toks[j])
            if constraint is not None:
                res.logprobs[r].append(lps[j])
        if len(thinking):
            think_rows = [j for j in thinking.tolist() if phase[j] == THINK]
            seen = _marker_seen([res.tokens[rows[j]] for j in think_rows], answer_ids,
                                tokenizer, answer)
            for j, hit in zip(think_rows, seen):
                if constraint is None:
                    done[j] = hit or toks[j] in stops
                elif hit:
                    phase[j], res.sid_start[rows[j]] = ANSWER, len(res.tokens[rows[j]])
        if constraint is not None:
            items = constraint.items_of_nodes(nodes).tolist()
            for j in range(len(rows)):
                if phase[j] == FORCE:
                    fpos[j] += 1
                    if fpos[j] == m:
                        phase[j], res.sid_start[rows[j]] = ANSWER, len(res.tokens[rows[j]])
                elif phase[j] == ANSWER and res.sid_start[rows[j]] < len(res.tokens[rows[j]]):
                    depth[j] += 1  # (not the rows that reached the answer just now)
                    if toks[j] == constraint.eos_token_id:
                        done[j], res.items[rows[j]] = True, items[j]
        if constraint is None and step == budget - 1:
            break
        if bool(done.all()):
            break
        if bool(done.any()):
            keep = torch.nonzero(~done).flatten()
            state.select(keep.to(dev))
            rows = [rows[j] for j in keep.tolist()]
            phase, fpos, depth = phase[keep], fpos[keep], depth[keep]
            keep = keep.to(dev)
            hidden, tok, nodes = hidden[keep], tok[keep], nodes[keep]
        hidden = runner.decode(tok, state)
        step += 1
    return res


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
    forced = torch.zeros(b, dtype=torch.bool)
    if budget == 0:
        return [list(answer_ids) for _ in range(b)], forced | True
    out = reason_rows(runner, prompts, answer_ids, budget, temperature, top_p, eos_token_id,
                      seed, tokenizer, answer).tokens
    stops = _stops(eos_token_id)
    for r in range(b):
        if out[r][-m:] != answer_ids and not _marker_seen([out[r]], answer_ids, tokenizer,
                                                          answer)[0]:
            if out[r] and out[r][-1] in stops:
                out[r].pop()
            else:
                forced[r] = True
            out[r].extend(answer_ids)
    return out, forced


def answer_constraint(index, tokenizer, device, answer: str, answer_end: str, answer_ids=None,
                      end_token_id: int | None = None, caller: str = "reasoning mode"):
    """(the marker's ids, the SID constraint closed by the end token). With a tokenizer they
    come from the `answer` / `answer_end` strings unless given; the SID is closed by the end
    marker's first token (all of it when it is one token). A given SIDConstraint must already
    end SIDs with that token."""
    if answer_ids is None:
        if tokenizer is None:
            raise InvalidInputError(f"{caller}: pass a tokenizer or answer_ids")
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not len(answer_ids):
        raise InvalidInputError("answer_ids: expected the marker's token ids, got none")
    if end_token_id is None and tokenizer is not None:
        end_token_id = tokenizer(answer_end, add_special_tokens=False)["input_ids"][0]
    if not isinstance(index, SIDConstraint):
        return answer_ids, SIDConstraint(index, tokenizer, eos_token_id=end_token_id,
                                         device=device)
    if end_token_id is not None and index.eos_token_id != end_token_id:
        raise InvalidInputError(f"the constraint ends SIDs with {index.eos_token_id}, reasoning "
                                f"mode needs {answer_end!r} ({end_token_id})")
    return answer_ids, index


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
    answer_ids, constraint = answer_constraint(index, tokenizer, runner.device, answer,
                                               answer_end, answer_ids, end_token_id,
                                               "reason_and_recommend")
    eos = getattr(tokenizer, "eos_token_id", None)
    reasoning, forced = think(runner, prompts, answer_ids, think_budget, temperature, top_p,
                              eos, seed, tokenizer, answer if tokenizer is not None else None)
    res = beam_search(runner, [p + r for p, r in zip(prompts, reasoning)], constraint,
                      num_beams, top_k, score)
    texts = [tokenizer.decode(r) for r in reasoning] if tokenizer is not None else [None] * len(prompts)
    return ReasoningResult(reasoning, texts, forced, res.items, res.scores)
