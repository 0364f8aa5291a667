"""Evaluation of a GREAM model on a dataset split (METHOD.md section 6).

Direct Sequence Recommendation: for every user of the split, the prompt is the user's history
(the last `max_history` = 20 items before the target, as SIDs joined by ", ") written as a seqrec
instruction, exactly as SFT saw it: the alignment row of gream_fast.tasks.align (the system
prompt, then the user message) rendered by the chat template that ChatEncoder uses for training
(the tokenizer's own, ChatML when it has none), up to the generation prompt. The instruction is
the first seqrec template, `TEMPLATES["seqrec"][0]` ("Here is what the user interacted with,
oldest first: {history}. Which item will the user pick next?"): training draws one of the pool
at random per example; evaluation uses this fixed one so every run scores the same prompts.

Beam search (gream_fast.generate.recommend) runs over the exact SID trie, so every ranked item
exists and a user's items are distinct. A SID ends with the token SFT taught the model to emit
after its answer: the chat template's end-of-turn token (<|im_end|> in ChatML), the tokenizer's
EOS when the template has none.

Outputs with `out`: `eval_{split}_rankings.jsonl` ({"user", "target", "ranked", "scores"} per
user, best first) and `eval_{split}_metrics.json`, each written atomically.
"""
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gream_fast.errors import InvalidInputError
from gream_fast.eval.metrics import DEFAULT_KS, check_ks, recall_ndcg
from gream_fast.files import write_json, write_jsonl

MODES = ("direct", "reasoning")
SPLITS = ("valid", "test")
SEQREC_TEMPLATE = 0  # index into TEMPLATES["seqrec"]; see the module docstring


class SeqRecPrompts:
    """History item ids -> the seqrec prompt text the model was trained on (see module doc)."""

    def __init__(self, tokenizer, index, system_prompt: bool = True,
                 chat_template: str | None = None, mode: str = "direct"):
        from gream_fast.tasks.chat import ChatEncoder
        from gream_fast.tasks.reason import REASON_PROMPTS
        from gream_fast.tasks.templates import TEMPLATES

        self.encoder = ChatEncoder(tokenizer, chat_template=chat_template)
        self.tokenizer, self.system_prompt, self.mode = tokenizer, system_prompt, mode
        # direct: the seqrec task's template; reasoning: the CoT rows' first prompt
        self.task = "seqrec" if mode == "direct" else "reason"
        self.template = (TEMPLATES["seqrec"][SEQREC_TEMPLATE].prompt if mode == "direct"
                         else REASON_PROMPTS[0])
        self.sids = ["".join(index.sid(i)) for i in range(index.num_items)]

    @property
    def stop_token_id(self) -> int | None:
        """The token that ends an answer: in reasoning mode the first token of `</answer>`;
        else the template's end of turn, else the tokenizer's EOS."""
        if self.mode == "reasoning":
            return self.tokenizer("</answer>", add_special_tokens=False)["input_ids"][0]
        eot = self.encoder.eot_id
        return eot if eot is not None else self.tokenizer.eos_token_id

    def messages(self, history) -> list:
        """The alignment row's messages up to (without) the assistant's answer."""
        from gream_fast.tasks.align import row
        from gream_fast.tasks.context import HISTORY_SEP

        bad = [i for i in history if not 0 <= int(i) < len(self.sids)]
        if bad:
            raise InvalidInputError(f"history: item {bad[0]} is not in the index "
                                    f"(0..{len(self.sids) - 1})")
        prompt = self.template.format(history=HISTORY_SEP.join(self.sids[int(i)] for i in history))
        return row(self.task, prompt, "", self.system_prompt)["messages"][:-1]

    def __call__(self, history) -> str:
        return self.tokenizer.apply_chat_template(
            self.messages(history), add_generation_prompt=True, tokenize=False,
            chat_template=self.encoder.chat_template)


def build_constraint(tokenizer, index, prompts: SeqRecPrompts, device):
    """The SID trie on `device`, ending each SID with the prompts' stop token."""
    from gream_fast.generate import SIDConstraint

    stop = prompts.stop_token_id
    if stop is None:
        raise InvalidInputError("the tokenizer has no eos_token and its chat template no "
                                "end-of-turn token: cannot tell where an answer ends")
    return SIDConstraint(index, tokenizer, eos_token_id=stop, device=device)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InvalidInputError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")


@dataclass
class Rankings:
    """Every evaluated user's ranking (rank_users)."""
    users: np.ndarray  # [U] user ids
    targets: np.ndarray  # [U] the held-out item of each
    items: np.ndarray  # [U, num_beams] ranked items, best first
    scores: np.ndarray  # [U, num_beams] their beam scores
    thoughts: list  # reasoning mode: each user's reasoning text (else empty)
    seconds: float
    device: str


def evaluate(model, tokenizer, dataset, index, mode: str = "direct", split: str = "test",
             ks=DEFAULT_KS, num_beams: int = 10, batch_size: int = 16, score: str = "full",
             out=None, *, max_history: int = 20, max_users: int | None = None,
             system_prompt: bool = True, chat_template: str | None = None, runner=None,
             progress: bool = True, think_budget: int = 512, temperature: float = 0.7,
             top_p: float = 0.9, seed: int = 0, world=None) -> dict:
    """Recall@K and NDCG@K of `model` on `split` ("valid" or "test") of `dataset`, one target
    per user: {"recall@1": ..., "ndcg@1": ..., ...}.

    index: the SemanticIndex of the dataset's items (its SID tokens must be in `tokenizer`), or
    a SIDConstraint from `build_constraint` to reuse across calls (as `runner`, from
    gream_fast.model.make_runner). The ranking of each user is its num_beams beams
    (num_beams >= max(ks)). max_users: only the first users (by id), for a quick look. out: a
    folder for the rankings and metrics files. mode="reasoning": each user's prompt is the CoT
    rows' prompt; the model thinks (think_budget tokens at most, sampled with temperature /
    top_p and seed; 0 = greedy) and answers by beam search (gream_fast.generate.reasoning); the
    reasoning text goes to the rankings file. world: a gream_fast.train.distributed.World whose
    ranks share the users (batch b runs on rank b % size exactly as it would in one process, so
    the metrics are one process's); a collective call, every rank returns all users' metrics."""
    ks = check_ks(ks)
    if num_beams < max(ks):
        raise InvalidInputError(f"num_beams: {num_beams} beams rank only {num_beams} items, but "
                                f"metrics@{max(ks)} need at least {max(ks)}: raise num_beams or "
                                "lower ks")
    if out is not None and world is not None and world.distributed:
        raise InvalidInputError("out: rankings files are written by a single process; evaluate "
                                "with world=None to write them")
    r = rank_users(model, tokenizer, dataset, index, mode, split, num_beams, batch_size, score,
                   max_history=max_history, max_users=max_users, system_prompt=system_prompt,
                   chat_template=chat_template, runner=runner, progress=progress,
                   think_budget=think_budget, temperature=temperature, top_p=top_p, seed=seed,
                   world=world)
    metrics = recall_ndcg(r.items, r.targets, ks)
    if out is not None:
        out = Path(out)
        write_jsonl(out / f"eval_{split}_rankings.jsonl", (
            {"user": int(u), "target": int(t), "ranked": i.tolist(), "scores": sc.tolist(),
             **({"reasoning": r.thoughts[j]} if r.thoughts else {})}
            for j, (u, t, i, sc) in enumerate(zip(r.users, r.targets, r.items, r.scores))))
        n = len(r.users)
        write_json(out / f"eval_{split}_metrics.json", {
            **metrics, "users": n, "split": split, "mode": mode, "num_beams": num_beams,
            "score": score, "max_history": max_history, "seqrec_template": SEQREC_TEMPLATE,
            "system_prompt": system_prompt, "device": r.device,
            "seconds": round(r.seconds, 3), "users_per_second": round(n / r.seconds, 2)})
    return metrics


def rank_users(model, tokenizer, dataset, index, mode: str = "direct", split: str = "test",
               num_beams: int = 10, batch_size: int = 16, score: str = "full", *,
               max_history: int = 20, max_users: int | None = None, system_prompt: bool = True,
               chat_template: str | None = None, runner=None, progress: bool = True,
               think_budget: int = 512, temperature: float = 0.7, top_p: float = 0.9,
               seed: int = 0, world=None) -> Rankings:
    """The rankings behind evaluate() (the same arguments, without ks and out): each user's
    num_beams items, best first, and their scores; every rank of `world` returns all users'."""
    check_mode(mode)
    constraint = None
    if not hasattr(index, "sid_codes"):  # a SIDConstraint: its index names the items
        constraint, index = index, index.index
    if split not in SPLITS:
        raise InvalidInputError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if score not in ("full", "sid"):
        raise InvalidInputError(f"score: expected 'full' or 'sid', got {score!r}")
    if num_beams > index.num_items:
        raise InvalidInputError(f"num_beams: {num_beams} is more than the {index.num_items} "
                                "items of the index")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size: expected >= 1, got {batch_size}")
    if max_users is not None and max_users < 0:
        raise InvalidInputError(f"max_users: expected >= 0 (0 or None: all), got {max_users}")
    if max_history < 1:
        raise InvalidInputError(f"max_history: expected >= 1, got {max_history}")
    if index.num_items != dataset.num_items:
        raise InvalidInputError(f"the index has {index.num_items} items but the dataset "
                                f"{dataset.num_items}: they must describe the same items")
    sharded = world is not None and world.distributed

    from tqdm.auto import tqdm

    from gream_fast.generate import reason_and_recommend, recommend
    from gream_fast.model import make_runner

    t0 = time.perf_counter()
    examples = getattr(dataset.split(max_history=max_history), split)
    n = len(examples) if not max_users else min(int(max_users), len(examples))
    if n == 0:
        raise InvalidInputError(f"split {split!r}: no users to evaluate")
    prompts = SeqRecPrompts(tokenizer, index, system_prompt, chat_template, mode)
    if runner is None:
        runner = make_runner(model)
    if constraint is None:
        constraint = build_constraint(tokenizer, index, prompts, runner.device)

    thoughts = []  # reasoning mode: each user's reasoning text
    # a rank's rows stay 0 outside its batches: the sum over ranks is every row once
    items = np.zeros((n, num_beams), np.int64)
    scores = np.zeros((n, num_beams), np.float32)
    starts = range(0, n, batch_size)
    if sharded:
        starts = starts[world.rank::world.size]
    mine = sum(min(batch_size, n - lo) for lo in starts)
    with tqdm(total=mine, desc=f"eval {split}", unit="user", disable=not progress) as bar:
        for lo in starts:
            hi = min(lo + batch_size, n)
            texts = [prompts(examples[e][1]) for e in range(lo, hi)]
            if mode == "direct":
                it, sc = recommend(model, tokenizer, constraint, texts, num_beams=num_beams,
                                   top_k=num_beams, score=score, runner=runner)
            else:
                res = reason_and_recommend(
                    model, tokenizer, constraint, texts, think_budget, temperature, top_p,
                    num_beams, num_beams, score, seed + lo, runner=runner,
                    end_token_id=constraint.eos_token_id)
                it, sc = res.items, res.scores
                thoughts.extend(res.texts)
            items[lo:hi], scores[lo:hi] = it.cpu().numpy(), sc.float().cpu().numpy()
            bar.update(hi - lo)
    if sharded:
        import torch

        from gream_fast.train.distributed import all_reduce

        items = all_reduce(torch.from_numpy(items), world).numpy()
        scores = all_reduce(torch.from_numpy(scores), world).numpy()
    return Rankings(examples.user[:n], examples.target[:n], items, scores, thoughts,
                    time.perf_counter() - t0, str(runner.device))
