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
from dataclasses import dataclass, fields

import torch

from gream_fast.errors import InvalidInputError
from gream_fast.generate.beam import beam_search
from gream_fast.generate.constraint import SIDConstraint
from gream_fast.generate.marker import MarkerAutomaton
from gream_fast.generate.recommend import encode_prompts
from gream_fast.kernels.trie_logits import sample_children, trie_topk
from gream_fast.model.runner import make_runner
from gream_fast.profiling import phase


@dataclass
class ReasoningResult:
    reasoning: list  # per prompt: generated token ids, ending with the answer marker
    texts: list  # the same decoded (None without a tokenizer)
    forced: torch.Tensor  # [B] bool: the think budget ran out and the marker was forced
    items: torch.Tensor  # [B, top_k]
    scores: torch.Tensor  # [B, top_k]


def sample_logits(logits, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else nucleus sampling. Token i is drawn
    with probability p_i as torch.multinomial draws it, at a fraction of its cost over a
    large vocabulary (_race)."""
    if temperature == 0:
        return logits.argmax(-1)
    p = torch.softmax(logits.float() / temperature, -1)
    if top_p == 1:
        return _race(p, generator)
    p, order = p.sort(-1, descending=True)
    before = p.cumsum(-1) - p
    p = torch.where(before < top_p, p, 0.0)  # the nucleus: at least the most likely token
    return order.gather(1, _race(p, generator)[:, None]).squeeze(1)


def _race(p: torch.Tensor, generator) -> torch.Tensor:
    """One index per row of the (unnormalised) probabilities p [R, V]. On a GPU an exponential
    race, argmax p_i / E_i with E_i ~ Exp(1): one parallel pass. On a CPU, where drawing V
    exponentials costs as much as torch.multinomial, the inverse CDF in two levels: one
    uniform per row picks a block of CDF_BLOCK tokens by the running sum (float64) of the
    blocks' sums, then a token by the running sum (float64) inside that block. A running sum
    over the whole row is sequential (a single float64 one took 6x as long at V=4096), and a
    float32 one over V entries would drift by ~V ulps; here each block's float32 sum is off by
    at most ~CDF_BLOCK ulps of its mass, the rounding of the float32 probabilities themselves.
    A draw that lands on a token of probability zero (u at a block's edge, within that
    rounding, or at the very end) takes the nearest token of nonzero probability before it."""
    if p.is_cuda:
        return (p / torch.empty_like(p).exponential_(generator=generator)).argmax(-1)
    r, v = p.shape
    b = CDF_BLOCK
    full = v // b * b
    sums = torch.cat([p[:, :full].view(r, -1, b).sum(-1), p[:, full:].sum(-1, keepdim=True)], 1)
    cdf = sums.cumsum(1, dtype=torch.float64)
    u = torch.rand(r, 1, dtype=torch.float64, generator=generator) * cdf[:, -1:]
    block = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[1] - 1)
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    cols = (block * b + torch.arange(b)).clamp(max=v - 1)  # (the ragged last block: v - 1)
    inner = p.gather(1, cols).cumsum(1, dtype=torch.float64)
    idx = cols.gather(1, torch.searchsorted(inner, u - before, right=True).clamp(max=b - 1))[:, 0]
    zero = p.gather(1, idx[:, None])[:, 0] == 0
    if bool(zero.any()):  # (a host check: free on the CPU)
        alive = p[zero] > 0
        alive &= torch.arange(v) <= idx[zero, None]  # at or before the draw
        alive[~alive.any(1)] = p[zero][~alive.any(1)] > 0  # (none before: any at all)
        idx[zero] = v - 1 - alive.flip(-1).int().argmax(-1)
    return idx


CDF_BLOCK = 128


THINK, FORCE, ANSWER, DONE = 0, 1, 2, 3  # a row's phase: free text, forced marker, SID, done


@dataclass
class ReasonRows:
    """What reason_rows generated, one row per (prompt, sample), on the runner's device."""
    tokens: torch.Tensor  # [R, W] int64: the reasoning up to the marker, then SID + end token
    logprobs: torch.Tensor  # [R, W] float32: each token's log-prob (with a constraint; else 0)
    lengths: torch.Tensor  # [R] int64: tokens per row (the rest of the row is padding)
    forced: torch.Tensor  # [R] bool: the think budget ran out and the marker was forced
    sid_start: torch.Tensor  # [R] int64: where the SID starts, after the marker (-1: no marker)
    items: torch.Tensor  # [R] int64: the item the SID names (-1: no answer phase)

    def token_lists(self) -> list:
        """Each row's tokens as a list (one host transfer)."""
        return [t[:n] for t, n in zip(self.tokens.tolist(), self.lengths.tolist())]


@dataclass
class RowState:
    """The rows still in the batch: one entry each, all device tensors. Finished rows (DONE)
    stay until the next sync point, then leave the batch (select)."""
    row: torch.Tensor  # [L] int64: the row's index in ReasonRows
    phase: torch.Tensor  # [L] int64: THINK, FORCE, ANSWER or DONE
    fpos: torch.Tensor  # [L] int64: marker tokens forced so far
    marker: torch.Tensor  # [L] int32: MarkerAutomaton state of the text so far
    node: torch.Tensor  # [L] int32: trie node in the answer phase
    depth: torch.Tensor  # [L] int64: SID tokens emitted (the SID level of the next one)

    def select(self, keep: torch.Tensor) -> "RowState":
        return RowState(*(getattr(self, f.name)[keep] for f in fields(self)))


@dataclass
class LoopSpec:
    """What does not change during the loop."""
    budget: int  # free-text tokens before the marker is forced
    marker_ids: torch.Tensor  # [m] the marker's ids, as forced
    automaton: MarkerAutomaton  # finds the marker in the generated text, however BPE split it
    stops: torch.Tensor  # [s] ids that end a turn (sampled while thinking: the marker replaces
    #                      them with a constraint, end the row without one)
    constraint: SIDConstraint | None  # the answer's trie (None: stop at the marker)
    score: str  # "full" or "sid": the SID tokens' log-probs (as in direct sampling)
    temperature: float
    top_p: float
    logprob_temperature: float  # the reported log-probs are log-softmax(logits / this)


def marker_automaton(tokenizer, answer: str | None, answer_ids, vocab_size: int):
    """The answer marker's automaton over the decoded text (with a tokenizer and the marker's
    text), else over its ids; built once per tokenizer and marker, then cached on it."""
    if tokenizer is None or answer is None:
        return MarkerAutomaton.from_ids(answer_ids, vocab_size)
    cache = tokenizer.__dict__.setdefault("_gream_markers", {})
    key = (answer, len(tokenizer))
    if key not in cache:
        cache[key] = MarkerAutomaton.from_tokenizer(tokenizer, answer)
    return cache[key]


def _answer_candidates(logits, st: RowState, spec: LoopSpec, gen):
    """A trie-constrained sample for every row (rows not answering sample from the root and
    are ignored: no subset, so no host sync): (token, child node, log-prob)."""
    con, lt = spec.constraint, spec.logprob_temperature
    nodes = torch.where(st.phase == ANSWER, st.node, 0)
    scaled = logits if lt == 1 else logits / lt
    with phase("gream.trie_mask"):
        s, t, c = trie_topk(scaled, nodes, con.indptr, con.tokens, con.max_children,
                            max_children=con.max_children)
        _, tok, child, lp = sample_children(s, t, c, spec.temperature / lt, spec.top_p,
                                            generator=gen, check=False)
    if spec.score == "sid":  # normalised over the token's SID level; the closing token: 0
        k = con.token_table.shape[1]
        level = st.depth.clamp(max=con.token_table.shape[0] - 1)
        cols = con.level_rows(0).start + level[:, None] * k + torch.arange(k, device=level.device)
        lse = torch.logsumexp(scaled.gather(1, cols), dim=1)
        lp = torch.where(tok == con.eos_token_id, 0.0, scaled.gather(1, tok[:, None])[:, 0] - lse)
    return tok, child.to(torch.int32), lp


def advance(st: RowState, out: ReasonRows, logits: torch.Tensor, step: int, spec: LoopSpec,
            gen) -> torch.Tensor:
    """One step of every row in the batch: its token (from logits [L, V]) written to `out`, its
    phase moved on. Tensor work only: no host sync. Returns the tokens to feed."""
    con = spec.constraint
    active = st.phase != DONE
    if con is not None and step == spec.budget:  # the budget is spent: answer now
        over = st.phase == THINK
        out.forced[st.row] |= over
        st.phase = torch.where(over, FORCE, st.phase)
    thinking = st.phase == THINK
    lt = spec.logprob_temperature
    logp = torch.log_softmax(logits / lt, -1) if con is not None else None
    if logp is not None and spec.temperature == lt and spec.top_p == 1:
        tok = _race(logp.exp(), gen)  # the same draw as sample_logits', one softmax less
    else:
        tok = sample_logits(logits, spec.temperature, spec.top_p, gen)  # every row, one draw
    lp = torch.zeros(len(tok), device=tok.device)
    answering = torch.zeros_like(thinking)
    if con is not None:
        stopped = thinking & torch.isin(tok, spec.stops)  # ended unanswered: the marker instead
        st.phase = torch.where(stopped, FORCE, st.phase)
        st.fpos = torch.where(stopped, 0, st.fpos)
        forcing = st.phase == FORCE
        m = len(spec.marker_ids)
        tok = torch.where(forcing, spec.marker_ids[st.fpos.clamp(max=m - 1)], tok)
        lp = logp.gather(1, tok[:, None])[:, 0]
        answering = st.phase == ANSWER
        # on a GPU every step samples an answer for every row (no host sync to ask first); on
        # a CPU asking is free, and most steps have no row answering
        if logits.is_cuda or bool(answering.any()):
            a_tok, a_node, a_lp = _answer_candidates(logits, st, spec, gen)
            tok, lp = torch.where(answering, a_tok, tok), torch.where(answering, a_lp, lp)
            st.node = torch.where(answering, a_node, st.node)
    # the token joins its row (finished rows write to the spare last column)
    pos = torch.where(active, out.lengths[st.row], out.tokens.shape[1] - 1)
    out.tokens[st.row, pos], out.logprobs[st.row, pos] = tok, lp
    out.lengths[st.row] += active.long()
    length = out.lengths[st.row]
    # the marker in the text of the rows still thinking
    still = thinking & (st.phase == THINK)
    st.marker = torch.where(still, spec.automaton.step(st.marker, tok), st.marker)
    hit = still & spec.automaton.accepted(st.marker)
    if con is None:  # sid_start: where an answer would begin (the marker was seen)
        out.sid_start[st.row] = torch.where(hit, length, out.sid_start[st.row])
        st.phase = torch.where(hit | (still & torch.isin(tok, spec.stops)), DONE, st.phase)
        return tok
    forcing = st.phase == FORCE
    st.fpos = torch.where(forcing, st.fpos + 1, st.fpos)
    begins = hit | (forcing & (st.fpos == m))  # the SID starts with the next token
    out.sid_start[st.row] = torch.where(begins, length, out.sid_start[st.row])
    ends = answering & (tok == con.eos_token_id)
    out.items[st.row] = torch.where(ends, con.items_of_nodes(st.node).long(), out.items[st.row])
    st.depth = torch.where(answering, st.depth + 1, st.depth)
    st.phase = torch.where(begins, ANSWER, torch.where(ends, DONE, st.phase))
    return tok


@torch.no_grad()
def reason_rows(runner, prompts, answer_ids, budget: int, temperature: float = 0.7,
                top_p: float = 0.9, eos_token_id=None, seed: int = 0, tokenizer=None,
                answer: str | None = None, n: int = 1, constraint=None,
                score: str = "full", logprob_temperature: float = 1.0,
                sync_every: int = 8, pad_id: int = 0) -> ReasonRows:
    """The reasoning loop behind think() and reasoning-mode sampling. n rows per prompt share
    its prefill and prompt KV; each writes free text (sample_logits at temperature / top_p)
    until the answer marker appears in its text (marker_automaton: the `answer` text through
    the tokenizer, else the ids answer_ids). Without a constraint a row stops at the marker or
    at a stop token (eos_token_id: an id or ids), and every row when the budget runs out.
    With one (an SIDConstraint whose EOS is the answer's end token) a row goes on: a sampled
    stop token is replaced by the marker, an exhausted budget forces the marker, the marker
    tokens are fed, then a SID is sampled under the trie (sample_children at temperature /
    top_p) and closed by the end token; every token gets the policy's log-prob at
    logprob_temperature (full vocabulary for text and the marker, `score` for the SID as in
    direct sampling).

    The rows' state lives in device tensors (RowState) and advance() moves it by a step with
    no host sync; every sync_every steps one sync drops the finished rows from the batch (and
    stops the loop when none is left). Seeded: the same seed and sync_every give the same rows.
    """
    answer_ids = [int(t) for t in answer_ids]
    if not answer_ids or budget < 0 or sync_every < 1:
        raise InvalidInputError("reason_rows: answer_ids must be non-empty, budget >= 0 and "
                                "sync_every >= 1")
    m, dev = len(answer_ids), runner.device
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    R = len(prompts) * n
    steps = budget + (m + constraint.max_len if constraint is not None else 0)
    hidden, kv = runner.prefill(prompts, n, max(steps, 1))
    hidden = hidden.repeat_interleave(n, 0)
    vocab = runner.lm_head.weight.shape[0]
    stop_ids = sorted(_stops(eos_token_id))
    spec = LoopSpec(budget, torch.tensor(answer_ids, device=dev),
                    marker_automaton(tokenizer, answer, answer_ids, vocab).to(dev),
                    torch.tensor(stop_ids, dtype=torch.int64, device=dev), constraint, score,
                    temperature, top_p, logprob_temperature)
    out = ReasonRows(torch.full((R, steps + 1), pad_id, dtype=torch.int64, device=dev),
                     torch.zeros(R, steps + 1, device=dev),
                     torch.zeros(R, dtype=torch.int64, device=dev),
                     torch.zeros(R, dtype=torch.bool, device=dev),
                     torch.full((R,), -1, dtype=torch.int64, device=dev),
                     torch.full((R,), -1, dtype=torch.int64, device=dev))
    zeros = torch.zeros(R, dtype=torch.int64, device=dev)
    st = RowState(torch.arange(R, device=dev), zeros.clone(), zeros.clone(),
                  zeros.to(torch.int32), zeros.to(torch.int32), zeros.clone())
    for step in range(steps):
        with phase("gream.reason.step"):
            tok = advance(st, out, runner.logits(hidden), step, spec, gen)
        if step == steps - 1:
            break
        if (step + 1) % sync_every == 0:  # the one host sync: finished rows leave the batch
            keep = torch.nonzero(st.phase != DONE).flatten()
            if not len(keep):
                break
            if len(keep) < len(st.row):
                st, tok = st.select(keep), tok[keep]
                kv.select(keep)
        hidden = runner.decode(tok, kv)
    width = int(out.lengths.max()) if R else 0
    out.tokens, out.logprobs = out.tokens[:, :width], out.logprobs[:, :width]
    return out


def _stops(eos_token_id) -> set:
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id}


def think(runner, prompts, answer_ids, budget: int, temperature: float = 0.7,
          top_p: float = 0.9, eos_token_id: int | None = None, seed: int = 0,
          tokenizer=None, answer: str | None = None):
    """Phase 1: reasoning tokens per prompt (ending with the marker) and whether forced. The
    marker is found as the token ids answer_ids, or, given a tokenizer and the `answer` text,
    in the decoded text (BPE tokenizes " <answer>" in running text unlike "<answer>" alone);
    a row that ends with a stop token instead has it replaced by the marker."""
    answer_ids = [int(t) for t in answer_ids]
    if not answer_ids or budget < 0:
        raise InvalidInputError("think: answer_ids must be non-empty and budget >= 0")
    b = len(prompts)
    if budget == 0:
        return [list(answer_ids) for _ in range(b)], torch.ones(b, dtype=torch.bool)
    res = reason_rows(runner, prompts, answer_ids, budget, temperature, top_p, eos_token_id,
                      seed, tokenizer, answer)
    out, stops, seen = res.token_lists(), _stops(eos_token_id), (res.sid_start >= 0).tolist()
    forced = torch.zeros(b, dtype=torch.bool)
    for r in range(b):
        if not seen[r]:
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
