"""Alignment rows, teacher texts, CoT samples and the curriculum, on a synthetic dataset."""
import itertools
import json
import re
import string
from collections import Counter

import numpy as np
import pytest

from gream_fast import GreamError
from gream_fast.cli import main
from gream_fast.data import Dataset
from gream_fast.data.prepare import prepare, write
from gream_fast.data.synth import SynthConfig, synthesize
from gream_fast.index import SemanticIndex
from gream_fast.tasks.align import AlignConfig, AlignmentBuilder
from gream_fast.tasks.context import TaskContext
from gream_fast.tasks.curriculum import BATCH, mix
from gream_fast.tasks.profile import build_item_texts, build_profiles
from gream_fast.tasks.reason import ReasonConfig, build_reasoning, denoise
from gream_fast.tasks.teacher import OpenAITeacher, TemplateTeacher
from gream_fast.tasks.templates import TEMPLATES

FIELDS = {"history", "titles", "sid", "title", "description", "query", "preference"}
SID = r"(?:<\|[a-z]_\d+\|>)+"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks") / "data"
    write(prepare(synthesize(SynthConfig(users=150, items=90, seed=2))), d)
    data = Dataset.load(d)
    codes = np.random.default_rng(0).integers(0, 8, (data.num_items, 3))
    return TaskContext(data, SemanticIndex.from_codes(codes, codebook_size=8))


def test_template_pools():
    for task, pool in TEMPLATES.items():
        assert len(pool) >= 10, task
        assert len({t.prompt for t in pool}) == len(pool), task
        for t in pool:
            used = {f for _, f, _, _ in string.Formatter().parse(t.prompt) if f}
            assert used <= FIELDS and used, (task, t.prompt)
            assert t.response in FIELDS | {"both"}


def item_by_sid(ctx):
    return {s: i for i, s in enumerate(ctx.sids)}


def test_alignment_rows_are_true_to_the_data(ctx):
    profiles = {p["user_id"]: p for p in build_profiles(ctx, TemplateTeacher())}
    cfg = AlignConfig(passes=2, fusion_per_pass=40, seed=3)
    builder = AlignmentBuilder(ctx, cfg, profiles)
    rows = builder.build()
    counts = Counter(r["task"] for r in rows)
    n_ex, n_items = len(builder.examples), ctx.data.num_items
    assert counts == {"seqrec": 2 * n_ex, "item2index": 2 * n_items, "index2item": 2 * n_items,
                      "fusionseqrec": 2 * 40, "itemsearch": 2 * len(profiles),
                      "preferenceobtain": 2 * len(profiles)}
    pairs = {(tuple(h), t) for _, h, t in builder.examples}
    sid_item = item_by_sid(ctx)
    used = Counter()
    for r in rows:
        system, user, answer = (m["content"] for m in r["messages"])
        assert r["messages"][0]["role"] == "system" and r["messages"][2]["role"] == "assistant"
        used[user.split(":")[0][:25]] += 1
        if r["task"] == "seqrec":
            history = [sid_item[s] for s in re.findall(SID, user)]
            assert (tuple(history), sid_item[answer]) in pairs
        elif r["task"] == "item2index":
            item = sid_item[answer]
            assert ctx.titles[item] in user or ctx.descriptions[item] in user
        elif r["task"] == "index2item":
            item = sid_item[re.search(SID, user).group()]
            assert answer in (ctx.titles[item], ctx.descriptions[item],
                              f"{ctx.titles[item]} {ctx.descriptions[item]}")
        elif r["task"] == "itemsearch":
            assert sid_item[answer] in {p["intent_item"] for p in profiles.values()}
    assert len(used) > 40  # many different templates drawn


def test_alignment_is_seeded(ctx):
    cfg = AlignConfig(passes=1, fusion_per_pass=30, tasks="seqrec,item2index,fusionseqrec")
    a = AlignmentBuilder(ctx, cfg).build()
    assert a == AlignmentBuilder(ctx, cfg).build()
    cfg.seed = 1
    assert a != AlignmentBuilder(ctx, cfg).build()
    with pytest.raises(GreamError, match="unknown"):
        AlignmentBuilder(ctx, AlignConfig(tasks="seqrec,nope")).build()


def test_reasoning_rows_follow_the_layout(ctx):
    rows, stats = build_reasoning(ctx, TemplateTeacher(), ReasonConfig(max_history=20))
    want = sum(max(0, len(s["items"]) - 2 - 4) for s in ctx.data.sequences)
    assert stats["samples"] == want == len(rows)
    layout = re.compile(r"<think>\n1\. Behavioural evidence: .+\n2\. Latent preferences: .+\n"
                        r"3\. Purchase intent: .+\n</think>\n\nLet's rewrite user's purchase "
                        rf"history: ({SID}(?:, {SID})*)\n\nBased on the above analysis, the "
                        rf"recommended product is <answer>({SID})</answer>\Z")
    sid_item = item_by_sid(ctx)
    targets = {}
    for s in ctx.data.sequences:
        train = s["items"][:-2]
        for t in range(4, len(train)):
            targets.setdefault(tuple(train[:t][-20:]), set()).add(train[t])
    for r in rows:
        user, answer = r["messages"][1]["content"], r["messages"][2]["content"]
        m = layout.match(answer)
        assert m, answer
        history = [sid_item[s] for s in re.findall(SID, user)]
        assert sid_item[m.group(2)] in targets[tuple(history)]
        assert m.group(1) == ", ".join(ctx.sids[i] for i in history)  # copy rewrite
        target = sid_item[m.group(2)]
        think = answer.split("</think>")[0]
        assert ctx.sids[target] not in think
        assert ctx.titles[target].rstrip(".") not in think


def test_template_teacher_ignores_the_hash_seed():
    """Category ties rank by first sight: the same history gives the same evidence text in
    processes with different string hash seeds (a set's order would not)."""
    import os
    import subprocess
    import sys

    script = ("from types import SimpleNamespace as NS\n"
              "from gream_fast.tasks.teacher import TemplateTeacher\n"
              "cats = [['Drama', 'Comedy', 'War', 'Crime'], ['Crime', 'War', 'Comedy', 'Drama']]\n"
              "ctx = NS(categories=cats, brands=['', ''])\n"
              "print(TemplateTeacher()._evidence(ctx, [0, 1]))")
    outs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout
            for seed in (0, 1)}  # seeds whose set orders of these names differ
    assert len(outs) == 1 and "Drama (2), Comedy (2) and War (2)" in outs.pop()


def test_denoise_keeps_order_and_at_least_half(ctx):
    for s in ctx.data.sequences[:50]:
        h = s["items"][:-2][-20:]
        kept = denoise(ctx, h)
        assert len(kept) >= (len(h) + 1) // 2
        it = iter(h)
        assert all(k in it for k in kept)  # a subsequence, order kept


def test_leaking_teacher_output_is_dropped(ctx):
    class Leaky(TemplateTeacher):
        def reasoning(self, ctx_, histories, targets):
            return [f"it is {ctx_.titles[t]}" if n % 2 else "fine"
                    for n, t in enumerate(targets)]

    rows, stats = build_reasoning(ctx, Leaky(), ReasonConfig())
    assert stats["dropped_leaking_target"] == stats["samples"] // 2
    assert len(rows) == stats["samples"] - stats["dropped_leaking_target"]


def test_profiles_and_item_texts(ctx):
    profiles = build_profiles(ctx, TemplateTeacher())
    assert len(profiles) == ctx.data.num_users
    for p in profiles:
        train = ctx.data.sequences[p["user_id"]]["items"][:-2]
        assert p["intent_item"] == train[-1] and p["history"] == train[:-1][-20:]
        assert p["preference"] and p["intent"].startswith("I am looking for")
        assert ctx.titles[p["intent_item"]].rstrip(".") not in p["intent"]
    texts = build_item_texts(ctx, TemplateTeacher())
    assert [t["id"] for t in texts] == list(range(ctx.data.num_items))
    assert texts[0]["text"].startswith(ctx.titles[0])


def test_openai_teacher_prompts(ctx):
    class FakeClient:
        def __init__(self):
            self.requests = []

        def complete_many(self, requests, cache_path=None):
            self.requests += requests
            return [f"answer {n}" for n in range(len(requests))]

    client = FakeClient()
    teacher = OpenAITeacher(client)
    out = teacher.reasoning(ctx, [[0, 1], [2]], [3, 4])
    assert out == ["answer 0", "answer 1"]
    prompt = client.requests[0][0]["content"]
    assert ctx.titles[0] in prompt and ctx.titles[3] not in prompt


def test_curriculum_order():
    align = [f"a{i}" for i in range(3 * 8 * 30)]
    reason = [f"r{i}" for i in range(8 * 40)]
    out = mix(align, reason, seed=5)
    assert sorted(out) == sorted(align + reason) and out == mix(align, reason, seed=5)
    assert out != mix(align, reason, seed=6)
    # parts 1 and 2: the first two thirds of the shuffled alignment rows, in order, in batches
    # of 8, with whole CoT batches of 8 between batches
    first_two = align_order(align, 5)[:480]
    region = out[: out.index(first_two[-1]) + 1]
    assert [x for x in region if x[0] == "a"] == first_two
    runs = [(k, len(list(g))) for k, g in itertools.groupby(region, key=lambda x: x[0])]
    assert all(n % BATCH == 0 for _, n in runs) and any(k == "r" for k, _ in runs)
    # insertions grow along a part: more CoT in the second half of part 1 than the first
    part1 = out[: out.index(first_two[239]) + 1]
    half = len(part1) // 2
    assert sum(x[0] == "r" for x in part1[half:]) > sum(x[0] == "r" for x in part1[:half])


def align_order(align, seed):
    import random

    rng = random.Random(seed)
    a = list(align)
    rng.shuffle(a)
    return a


def test_cli_end_to_end(tmp_path, ctx, capsys):
    data = tmp_path / "data"
    write(prepare(synthesize(SynthConfig(users=80, items=40, seed=1))), data)
    n = Dataset.load(data).num_items
    SemanticIndex.from_codes(np.random.default_rng(1).integers(0, 6, (n, 3)),
                             codebook_size=8).to_index_json(tmp_path / "x.index.json")
    args = ["--data", str(data), "--index", str(tmp_path / "x.index.json")]
    assert main(["tasks", "align", *args, "--out", str(tmp_path / "align.jsonl")]) == 2
    assert "run `gream-fast tasks profile" in capsys.readouterr().err
    assert main(["tasks", "profile", "--data", str(data), "--items"]) == 0
    assert (data / "profiles.jsonl").exists() and (data / "item_texts.jsonl").exists()
    assert main(["tasks", "align", *args, "--out", str(tmp_path / "align.jsonl"), "--passes", "1"]) == 0
    assert main(["tasks", "reason", *args, "--out", str(tmp_path / "reason.jsonl"),
                 "--rewrite", "denoise"]) == 0
    assert main(["tasks", "mix", "--align", str(tmp_path / "align.jsonl"), "--reason",
                 str(tmp_path / "reason.jsonl"), "--out", str(tmp_path / "sft.jsonl")]) == 0
    lines = (tmp_path / "sft.jsonl").read_text().splitlines()
    total = sum(1 for _ in open(tmp_path / "align.jsonl")) + sum(1 for _ in open(tmp_path / "reason.jsonl"))
    assert len(lines) == total and all(json.loads(l)["messages"] for l in lines)
    cfg = json.loads((tmp_path / "align.jsonl.config.json").read_text())
    assert cfg["passes"] == 1


def test_profiles_are_validated(tmp_path, ctx):
    from gream_fast.tasks.align import check_profiles, load_profiles

    (tmp_path / "profiles.jsonl").write_text('{"user_id": 0, "history": [1]}\n')
    with pytest.raises(GreamError, match=r"profiles.jsonl:1: expected a profile"):
        load_profiles(tmp_path)
    stale = {0: {"user_id": 0, "history": [1], "intent_item": 10_000, "preference": "p",
                 "intent": "i"}}
    with pytest.raises(GreamError, match="rerun `gream-fast tasks profile`"):
        check_profiles(stale, ctx.data, tmp_path / "profiles.jsonl")
