"""Reasoning data (METHOD.md section 4): CoT samples whose responses think in three steps,
rewrite the history, then answer with the target SID. `gream-fast tasks reason`."""
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from gream_fast.data.dataset import Dataset
from gream_fast.errors import InvalidInputError
from gream_fast.files import check_output, write_json, write_jsonl
from gream_fast.tasks.align import row
from gream_fast.tasks.context import HISTORY_SEP, TaskContext, load_index, rng_for
from gream_fast.tasks.teacher import RECENCY, make_teacher

FIRST_TARGET = 4  # CoT targets start at this position of the training sequence

REASON_PROMPTS = [
    "Here is a user's purchase history, oldest first: {history}. Think about what it shows, then recommend the next item.",
    "A user bought these items in order: {history}. Reason step by step about their behaviour and intent, then give the next item.",
    "Purchase history: {history}. Analyse the user's preferences and predict what they will buy next.",
    "Given the items {history}, work out what the user is after and recommend one item.",
]


@dataclass
class ReasonConfig:
    data: str = ""
    index: str = ""
    out: str = "reason.jsonl"
    teacher: str = "template"
    rewrite: str = "copy"  # copy: the history verbatim (reference); denoise: drop off-intent items
    max_history: int = 20
    seed: int = 0
    system_prompt: bool = True


def response(steps: str, rewritten: str, target_sid: str) -> str:
    """The layout the released checkpoints emit, exactly."""
    return (f"<think>\n{steps}\n</think>\n\nLet's rewrite user's purchase history: {rewritten}"
            f"\n\nBased on the above analysis, the recommended product is <answer>{target_sid}</answer>")


def denoise(ctx: TaskContext, history: list) -> list:
    """Keep the items that share a category with the user's main interests (the top recency-
    weighted categories and the latest item's); never fewer than half, most recent first."""
    weight = Counter()
    for age, item in enumerate(reversed(history)):
        for c in ctx.categories[item]:
            weight[c] += RECENCY ** age
    focus = {c for c, _ in weight.most_common(3)} | set(ctx.categories[history[-1]])
    keep = [i for i in history if focus & set(ctx.categories[i]) or not ctx.categories[i]]
    floor = (len(history) + 1) // 2
    if len(keep) < floor:
        extra = [i for i in reversed(history) if i not in keep][: floor - len(keep)]
        keep = [i for i in history if i in keep or i in extra]
    return keep


def leaks(ctx: TaskContext, text: str, target: int) -> bool:
    """Does a teacher's text name the target by SID or title?"""
    title = ctx.titles[target].rstrip(".").strip().lower()
    return ctx.sids[target] in text or (len(title) >= 4 and title in text.lower())


def build_reasoning(ctx: TaskContext, teacher, cfg: ReasonConfig) -> tuple[list, dict]:
    if cfg.rewrite not in ("copy", "denoise"):
        raise InvalidInputError(f"rewrite {cfg.rewrite!r}: expected 'copy' or 'denoise'")
    ex = ctx.data.examples(first=FIRST_TARGET, last_offset=2, max_history=cfg.max_history)
    histories = [ex[e][1] for e in range(len(ex))]
    targets = ex.target.tolist()
    steps = teacher.reasoning(ctx, histories, targets)
    rng = rng_for(cfg.seed, "reason")
    rows, dropped = [], 0
    for h, t, s in zip(histories, targets, steps):
        if leaks(ctx, s, t):
            dropped += 1  # the steps must not give the answer away
            continue
        kept = h if cfg.rewrite == "copy" else denoise(ctx, h)
        prompt = REASON_PROMPTS[rng.integers(len(REASON_PROMPTS))].format(history=ctx.history_text(h))
        rows.append(row("reason", prompt,
                        response(s, HISTORY_SEP.join(ctx.sids[i] for i in kept), ctx.sids[t]),
                        cfg.system_prompt))
    return rows, {"samples": len(targets), "written": len(rows), "dropped_leaking_target": dropped}


def run(cfg: ReasonConfig) -> tuple[list, dict]:
    check_output(cfg.out, command="tasks reason", inputs=[cfg.data, cfg.index], folder=False)
    data = Dataset.load(cfg.data)
    ctx = TaskContext(data, load_index(cfg.index))
    teacher = make_teacher(cfg.teacher, Path(cfg.data) / f".teacher-{cfg.teacher}.cache.jsonl")
    rows, stats = build_reasoning(ctx, teacher, cfg)
    write_jsonl(cfg.out, rows)
    write_json(str(cfg.out) + ".config.json", {**asdict(cfg), "stats": stats})
    return rows, stats
