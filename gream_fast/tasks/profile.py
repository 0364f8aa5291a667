"""`gream-fast tasks profile`: user preference summaries and intent queries (for itemsearch and
preferenceobtain), and optionally enriched item descriptions, written beside the dataset."""
from dataclasses import dataclass
from pathlib import Path

from gream_fast.data.dataset import Dataset
from gream_fast.files import write_jsonl
from gream_fast.tasks.align import PROFILES
from gream_fast.tasks.context import TaskContext
from gream_fast.tasks.teacher import make_teacher

ITEM_TEXTS = "item_texts.jsonl"


@dataclass
class ProfileConfig:
    data: str = ""
    teacher: str = "template"
    items: bool = False  # also write item_texts.jsonl (title + description + reviews)
    max_history: int = 20


def build_profiles(ctx: TaskContext, teacher, max_history: int = 20) -> list:
    """One profile per user, from training items only: the preference summary of the history
    before the last training item, and an intent query that this last item satisfies."""
    histories, targets, users = [], [], []
    for s in ctx.data.sequences:
        train = s["items"][:-2]
        if len(train) < 2:
            continue
        users.append(s["user_id"])
        histories.append(train[:-1][-max_history:])
        targets.append(train[-1])
    prefs = teacher.preference(ctx, histories)
    intents = teacher.intent(ctx, histories, targets)
    return [{"user_id": u, "history": h, "intent_item": t, "preference": p, "intent": q}
            for u, h, t, p, q in zip(users, histories, targets, prefs, intents)]


def build_item_texts(ctx: TaskContext, teacher) -> list:
    reviews: dict = {}
    for r in ctx.data.reviews():  # training interactions only (data prepare made sure)
        reviews.setdefault(r["item_id"], []).append(r.get("summary") or r.get("text", "")[:200])
    items = list(range(ctx.data.num_items))
    return [{"id": i, "text": t} for i, t in zip(items, teacher.item_text(ctx, items, reviews))]


def run(cfg: ProfileConfig) -> list:
    data = Dataset.load(cfg.data)
    ctx = TaskContext(data)
    teacher = make_teacher(cfg.teacher, Path(cfg.data) / f".teacher-{cfg.teacher}.cache.jsonl")
    profiles = build_profiles(ctx, teacher, cfg.max_history)
    write_jsonl(Path(cfg.data) / PROFILES, profiles)
    if cfg.items:
        write_jsonl(Path(cfg.data) / ITEM_TEXTS, build_item_texts(ctx, teacher))
    return profiles
