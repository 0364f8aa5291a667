"""recommend(): prompts in, ranked real items out."""
import torch

from gream_fast.errors import InvalidInputError
from gream_fast.generate.beam import beam_search
from gream_fast.generate.constraint import SIDConstraint
from gream_fast.model.runner import make_runner, plan_batches


def encode_prompts(tokenizer, prompts) -> list:
    """Strings are tokenized exactly as given (no special tokens added: the caller formats
    them, e.g. with a chat template); token-id lists pass through."""
    if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise InvalidInputError("prompts: expected a non-empty list of strings or token-id lists")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise InvalidInputError(f"prompts[{i}] is a string but no tokenizer was given")
            p = tokenizer(p, add_special_tokens=False)["input_ids"]
        p = [int(t) for t in p]
        if not p:
            raise InvalidInputError(f"prompts[{i}] is empty")
        out.append(p)
    return out


def recommend(model, tokenizer, index, prompts, num_beams: int = 10, top_k: int = 10,
              score: str = "full", length_penalty: float = 1.0, early_stopping=False,
              runner=None, memory_budget: int | None = None):
    """Top-k items for each prompt by trie-constrained beam search: (items int64 [B, top_k],
    scores float32 [B, top_k]), best first. Every item exists and a row's items are distinct.

    index: a SemanticIndex (its SID tokens must be in `tokenizer`) or a ready SIDConstraint
    (build it once when recommending many batches). score="full" ranks as HF `generate` with
    an exact trie does; score="sid" normalises each step over the level's SID tokens and skips
    the full LM head (see gream_fast.generate.beam for how the rankings can differ).
    Prompts are run in as many batches as the device memory needs (memory_budget bytes; by
    default 80% of the free GPU memory, unlimited on CPU): split, never dropped."""
    runner = runner or make_runner(model)
    constraint = index if isinstance(index, SIDConstraint) else SIDConstraint(
        index, tokenizer, device=runner.device)
    if constraint.device != torch.device(runner.device):
        constraint = constraint.to(runner.device)
    prompts = encode_prompts(tokenizer, prompts)
    items, scores = [], []
    for chunk in plan_batches(runner, prompts, num_beams, constraint.max_len, memory_budget):
        res = beam_search(runner, prompts[chunk], constraint, num_beams, top_k, score,
                          length_penalty, early_stopping)
        items.append(res.items)
        scores.append(res.scores)
    return torch.cat(items), torch.cat(scores)
