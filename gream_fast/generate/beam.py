"""Trie-constrained beam search over SIDs, step for step the search of Hugging Face `generate`
(num_beams, length_penalty, early_stopping), on our runner and the trie_topk kernel.

Per step and prompt: every live beam proposes its best 2 x num_beams children (trie_topk:
mask + log-softmax + top-k in one pass); the best 2 x num_beams of all proposals are kept;
those among the first num_beams that end in EOS become finished hypotheses (score divided by
generated_length ** length_penalty), the best num_beams that do not end continue. A prompt
stops accepting hypotheses once no running beam can beat its worst finished one (HF's
heuristic). All of it is tensor work over [B, beams]: no Python loop over rows, and no host
synchronisation inside the loop (the prompts that stopped early just add nothing).

Scores: score="full" uses log-softmax over the whole vocabulary (what HF computes);
score="sid" normalises over the current level's SID tokens only and never computes the full
LM head. The two rank differently when the model puts different mass on non-SID tokens at
different beams: "sid" ignores that mass, "full" counts it against the beam. After a
complete SID the only choice is EOS, scored 0 in "sid" mode.
"""
from dataclasses import dataclass

import torch

from gream_fast.errors import GreamError, InvalidInputError
from gream_fast.kernels.trie_logits import trie_topk
from gream_fast.profiling import phase

NEG = float("-inf")


@dataclass
class BeamResult:
    items: torch.Tensor  # [B, top_k] int64 item ids, best first
    scores: torch.Tensor  # [B, top_k] float32 length-normalised log-probs (HF's sequences_scores)
    tokens: torch.Tensor  # [B, top_k, max_len] generated token ids, -1 padding after EOS


def step_candidates(runner, hidden, nodes, constraint, depth, k, score, temperature=1.0):
    """Each row's best k children: (scores [R, k], tokens [R, k], child nodes [R, k]); the
    scores are log-softmax of logits / temperature."""
    if score == "full":
        logits = _scaled(runner.logits(hidden), temperature)
        with phase("gream.trie_mask"):
            return trie_topk(logits, nodes, constraint.indptr, constraint.tokens, k,
                             max_children=constraint.max_children)
    rows = constraint.level_rows(min(depth, constraint.token_table.shape[0] - 1))
    logits = _scaled(runner.logits(hidden, rows), temperature)
    with phase("gream.trie_mask"):
        s, t, c = trie_topk(logits, nodes, constraint.indptr, constraint.tokens, k,
                            token_offset=rows.start, max_children=constraint.max_children)
    # rows at a complete SID: EOS is outside the slice; it is their only move, with score 0
    end = constraint.ends[nodes.clamp(min=0).long()] & (nodes >= 0)
    eos_child = constraint.indptr[nodes.clamp(min=0).long()] + 1
    s[:, 0] = torch.where(end, 0.0, s[:, 0])
    t[:, 0] = torch.where(end, constraint.eos_token_id, t[:, 0])
    c[:, 0] = torch.where(end, eos_child.to(c.dtype), c[:, 0])
    return s, t, c


def _scaled(logits, temperature):
    return logits if temperature == 1 else logits / temperature


@torch.no_grad()
def beam_search(runner, prompts, constraint, num_beams: int = 10, top_k: int = 10,
                score: str = "full", length_penalty: float = 1.0,
                early_stopping: bool | str = False) -> BeamResult:
    """Beam search for each prompt (a token-id list) under `constraint` (SIDConstraint)."""
    if score not in ("full", "sid"):
        raise InvalidInputError(f"score: expected 'full' or 'sid', got {score!r}")
    if not 1 <= top_k <= num_beams:
        raise InvalidInputError(f"top_k: expected 1..num_beams ({num_beams}), got {top_k}")
    if top_k > constraint.num_items:
        raise InvalidInputError(f"top_k {top_k} > the {constraint.num_items} items of the index")
    nb, keep, max_len = num_beams, 2 * num_beams, constraint.max_len
    b = len(prompts)
    dev = runner.device
    hidden, state = runner.prefill(prompts, nb, max_len)
    ar = torch.arange(b, device=dev)[:, None]

    nodes = torch.zeros(b, 1, dtype=torch.int32, device=dev)  # step 0: one beam, at the root
    run_scores = torch.zeros(b, 1, device=dev)
    run_tokens = torch.full((b, nb, max_len), -1, dtype=torch.int64, device=dev)
    fin_scores = torch.full((b, nb), NEG, device=dev)
    fin_nodes = torch.full((b, nb), -1, dtype=torch.int32, device=dev)
    fin_tokens = torch.full((b, nb, max_len), -1, dtype=torch.int64, device=dev)
    open_ = torch.ones(b, dtype=torch.bool, device=dev)  # HF's "early stop heuristic unsatisfied"
    for t in range(max_len):
        width = nodes.shape[1]
        s, tok, child = step_candidates(runner, hidden, nodes.reshape(-1), constraint, t, keep, score)
        total = (run_scores[:, :, None] + s.view(b, width, keep)).view(b, -1)
        top_s, top_i = torch.topk(total, keep)  # [B, keep]
        parent = top_i // keep
        top_tok = tok.view(b, -1).gather(1, top_i)
        top_child = child.view(b, -1).gather(1, top_i)
        seqs = run_tokens[ar, parent]
        seqs[:, :, t] = top_tok
        alive = top_s > NEG
        eos = (top_tok == constraint.eos_token_id) & alive

        # finished: EOS among the first num_beams, length-normalised, merged into the pool
        cand = top_s / float(t + 1) ** length_penalty
        full = (fin_scores > NEG).all(1, keepdim=True) & (early_stopping is True)
        ok = eos & (torch.arange(keep, device=dev) < nb)[None] & open_[:, None] & ~full
        cand = torch.where(ok, cand, NEG)
        merged = torch.cat([fin_scores, cand], 1)
        fin_scores, pick = torch.topk(merged, nb)
        fin_nodes = torch.cat([fin_nodes, top_child], 1).gather(1, pick)
        fin_tokens = torch.cat([fin_tokens, seqs], 1)[ar, pick]

        # running: the best num_beams that did not end
        run_scores, pick = torch.topk(torch.where(eos, NEG, top_s), nb)
        nodes = top_child.gather(1, pick)
        nodes = torch.where(run_scores > NEG, nodes, -1)
        run_tokens = seqs[ar, pick]
        parents = parent.gather(1, pick)

        # can a running beam still beat the worst finished one? (HF: early_stopping=False
        # assumes the current length; "never" with a positive penalty, the longest possible)
        length = max_len if (early_stopping == "never" and length_penalty > 0) else t + 1
        best = run_scores[:, 0] / float(length) ** length_penalty
        all_done = (fin_scores > NEG).all(1)
        open_ &= ~all_done | (best > fin_scores.min(1).values)
        if early_stopping is True:
            open_ &= ~all_done
        if t == max_len - 1:  # no early exit: a host sync per step costs more than the
            break             # rare step it could save (SIDs end within one level of each other)
        if t:
            state.reorder((parents + ar * nb).view(-1))
        tokens = torch.where(nodes >= 0, run_tokens[:, :, t], constraint.eos_token_id)
        hidden = runner.decode(tokens.view(-1), state)

    items = constraint.items_of_nodes(fin_nodes[:, :top_k])
    if bool((fin_scores[:, :top_k] == NEG).any()) or bool((items < 0).any()):
        raise GreamError(f"beam search finished fewer than top_k={top_k} items for some prompt "
                         f"(num_beams={nb}, {constraint.num_items} items)")
    return BeamResult(items.long(), fin_scores[:, :top_k], fin_tokens[:, :top_k])
