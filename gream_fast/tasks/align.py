"""Alignment tasks (METHOD.md section 3): instruction/response rows that ground SIDs in item
text and user behaviour. `gream-fast tasks align`."""
import functools
import string
from dataclasses import asdict, dataclass
from pathlib import Path

from gream_fast.data.dataset import Dataset
from gream_fast.errors import DataError, InvalidInputError
from gream_fast.files import check_output, iter_jsonl, write_json, write_jsonl
from gream_fast.tasks.context import TaskContext, load_index, rng_for
from gream_fast.tasks.templates import SYSTEM_PROMPT, TEMPLATES

TASKS = tuple(TEMPLATES)
PROFILES = "profiles.jsonl"  # written beside the dataset by `gream-fast tasks profile`


@dataclass
class AlignConfig:
    data: str = ""
    index: str = ""
    out: str = "align.jsonl"
    passes: int = 3  # the reference walks its task mix three times
    seed: int = 0
    tasks: str = ",".join(TASKS)
    fusion_per_pass: int = 50_000  # fusionseqrec examples drawn per pass (reference: 50,000)
    max_history: int = 20
    system_prompt: bool = True


def row(task: str, prompt: str, response: str, system: bool) -> dict:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return {"task": task, "messages": messages}


def load_profiles(directory) -> dict:
    path = Path(directory) / PROFILES
    if not path.exists():
        raise InvalidInputError(f"{path}: no user profiles; itemsearch and preferenceobtain need "
                                f"them: run `gream-fast tasks profile --data {directory}` first")
    out = {}
    for n, _, rec in iter_jsonl(path):
        ok = (isinstance(rec, dict) and isinstance(rec.get("user_id"), int)
              and isinstance(rec.get("history"), list) and isinstance(rec.get("intent_item"), int)
              and isinstance(rec.get("preference"), str) and isinstance(rec.get("intent"), str))
        if not ok:
            raise DataError(f"{path}:{n}: expected a profile with user_id, history, intent_item, "
                            "preference and intent (written by `gream-fast tasks profile`)")
        out[rec["user_id"]] = rec
    return out


def check_profiles(profiles: dict, data, path) -> None:
    """Profiles must describe this dataset's users and items (not an earlier `data prepare`)."""
    for u, rec in profiles.items():
        items = rec["history"] + [rec["intent_item"]]
        if not 0 <= u < data.num_users or any(not 0 <= i < data.num_items for i in items):
            raise DataError(f"{path}: the profile of user {u} names users or items this dataset "
                            f"does not have ({data.num_users} users, {data.num_items} items): "
                            "rerun `gream-fast tasks profile`")


class AlignmentBuilder:
    def __init__(self, ctx: TaskContext, cfg: AlignConfig, profiles: dict | None = None):
        self.ctx, self.cfg, self.profiles = ctx, cfg, profiles or {}
        self.examples = ctx.data.examples(first=1, last_offset=2, max_history=cfg.max_history)

    def _fields(self, item: int) -> dict:
        c = self.ctx
        return {"sid": c.sids[item], "title": c.titles[item], "description": c.descriptions[item]}

    def _render(self, task, rng, fields: dict) -> tuple[str, str] | None:
        """A random template of `task` whose fields are all non-empty; None if none fits."""
        pool = [t for t in TEMPLATES[task] if all(
            fields.get(k) for k in _needs(t))]
        if not pool:
            return None
        t = pool[rng.integers(len(pool))]
        response = (f"{fields['title']} {fields['description']}" if t.response == "both"
                    else fields[t.response])
        return t.prompt.format(**fields), response

    def _emit(self, out, task, rng, fields):
        r = self._render(task, rng, fields)
        if r is not None:
            out.append(row(task, r[0], r[1], self.cfg.system_prompt))

    def seqrec(self, rng, out, examples=None):
        ex = examples if examples is not None else range(len(self.examples))
        for e in ex:
            _, history, target = self.examples[e]
            self._emit(out, "seqrec", rng, {"history": self.ctx.history_text(history),
                                            "sid": self.ctx.sids[target]})

    def item2index(self, rng, out):
        for i in range(self.ctx.data.num_items):
            self._emit(out, "item2index", rng, self._fields(i))

    def index2item(self, rng, out):
        for i in range(self.ctx.data.num_items):
            self._emit(out, "index2item", rng, self._fields(i))

    def fusionseqrec(self, rng, out):
        n = min(self.cfg.fusion_per_pass, len(self.examples))
        for e in rng.choice(len(self.examples), size=n, replace=False):
            _, history, target = self.examples[int(e)]
            fields = {**self._fields(target), "history": self.ctx.history_text(history),
                      "titles": self.ctx.titles_text(history)}
            self._emit(out, "fusionseqrec", rng, fields)

    def itemsearch(self, rng, out):
        for u, prof in sorted(self.profiles.items()):
            history = prof["history"]
            query = prof["intent"] if rng.random() < 0.5 else prof["preference"]
            fields = {"history": self.ctx.history_text(history), "query": query,
                      "sid": self.ctx.sids[prof["intent_item"]]}
            self._emit(out, "itemsearch", rng, fields)

    def preferenceobtain(self, rng, out):
        for u, prof in sorted(self.profiles.items()):
            fields = {"history": self.ctx.history_text(prof["history"] + [prof["intent_item"]]),
                      "preference": prof["preference"]}
            self._emit(out, "preferenceobtain", rng, fields)

    def build(self) -> list:
        tasks = task_list(self.cfg.tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise InvalidInputError(f"tasks: unknown {unknown}; expected some of {', '.join(TASKS)}")
        rows = []
        for p in range(self.cfg.passes):
            for task in tasks:
                getattr(self, task)(rng_for(self.cfg.seed, task, p), rows)
        return rows


def task_list(spec: str) -> list:
    return [t.strip() for t in spec.split(",") if t.strip()]


@functools.lru_cache(maxsize=None)
def _needs(template) -> list:
    fields = [f for _, f, _, _ in string.Formatter().parse(template.prompt) if f]
    return fields + (["title", "description"] if template.response == "both" else [template.response])


def run(cfg: AlignConfig) -> list:
    check_output(cfg.out, command="tasks align", inputs=[cfg.data, cfg.index], folder=False)
    data = Dataset.load(cfg.data)
    ctx = TaskContext(data, load_index(cfg.index))
    profiles = {}
    if {"itemsearch", "preferenceobtain"} & set(task_list(cfg.tasks)):
        profiles = load_profiles(cfg.data)
        check_profiles(profiles, data, Path(cfg.data) / PROFILES)
        if not profiles:
            raise DataError(f"{Path(cfg.data) / PROFILES}: no profiles for itemsearch / "
                            "preferenceobtain")
    rows = AlignmentBuilder(ctx, cfg, profiles).build()
    write_jsonl(cfg.out, rows)
    write_json(str(cfg.out) + ".config.json", asdict(cfg))
    return rows
