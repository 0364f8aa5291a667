"""`gream-fast demo [--profile quick|default|full] [--out RUN_DIR]`: every stage on MovieLens-100K
with the tiny model, under one run folder, ending in a report (report.json, report.md, SVG
training curves). Profiles (PROFILES): quick (a smoke run, ~2 minutes), default (~8 minutes on
a 2-core CPU), full (~20 minutes: the settings chosen on validation users, FULL).

Stages and their outputs (a stage whose output exists is skipped, so a rerun resumes; an SFT or
SRPO run that was cut off continues from its newest checkpoint):
  data            ml-100k/                  the built-in MovieLens-100K, cleaned (k-core 5)
  embed           emb.safetensors           item texts -> MiniLM embeddings
  index           index/                    RQ-KMeans semantic IDs
  tasks           ml-100k/profiles.jsonl, align.jsonl, reason.jsonl
  mix             sft_align.jsonl, sft_curriculum.jsonl
  popularity      popularity.json           most-interacted training items, same list for all
  sft_align       sft_align/final           SFT from --init tiny on alignment rows only
  sft_curriculum  sft_curriculum/final      continues sft_align on the curriculum rows
  srpo            srpo/final                direct-mode SRPO from sft_curriculum, validated every
                                            few steps (the curve is in the report); its final
                                            policy is the "srpo" model evaluated (best/, picked
                                            on validation, would be optimistic there)
  sft_continued   sft_continued/final       the control: sft_curriculum trained on for about
                                            SRPO's wall time with SFT instead (its rows again)
  eval            eval/STAGE/MODE/          validation and test metrics of every model in both
                                            modes, and the per-user rankings behind them

The SFT subset: the full task files are far too large for a CPU run (ML-100K gives ~100k
alignment rows per pass and ~94k CoT rows), so the demo draws a seeded random subset of
`align_rows` alignment rows and `cot_rows` CoT rows (align.jsonl is grouped by task, so a plain
prefix would hold one task only) and puts them through tasks.curriculum.mix: sft_align.jsonl is
the alignment subset alone, sft_curriculum.jsonl its curriculum order with the CoT subset. SFT
reads both in order; sft_curriculum continues from sft_align's weights.

For the CPU budget the backbone is the small tiny model (hidden 128, 2 layers; model/tiny.py):
on this data the number of next-item targets seen matters more than width, and it trains ~3.5x
the tokens/s of the base size. **beyond** METHOD.md, SFT also runs with history_loss (train sft
--history-loss), training on the SID tokens of the prompts' histories too, so each seqrec row is
~20 next-item targets instead of one. Without it a few minutes of CPU SFT see too few targets to
beat popularity (test Recall@10 0.020-0.030 against 0.045 in the runs before this option)."""
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

KS = (1, 5, 10)
REPORT_KEYS = ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")
MODEL_STAGES = ("sft_align", "sft_curriculum", "srpo", "sft_continued")
MODES = ("direct", "reasoning")
SPLITS = ("valid", "test")


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    profile: str = "default"  # PROFILES: the sizes make_config starts from
    device: str = "auto"
    seed: int = 0
    # tasks: the files generated (one alignment pass, fewer fusionseqrec rows than the reference)
    align_passes: int = 1
    fusion_per_pass: int = 5000
    index_iters: int = 20
    # the SFT subset (see the module docstring)
    align_rows: int = 24000
    cot_rows: int = 6000
    # SFT (--init tiny --tiny-size small; 512 x 8 does ~15k tokens/s on a 2-core CPU)
    tiny_size: str = "small"
    seq_len: int = 512
    batch_size: int = 8
    lr: float = 2e-3
    sft_align_steps: int = 500
    sft_curriculum_steps: int = 500
    # the control: SFT steps in about the SRPO stage's wall time on a 2-core CPU (~0.2 s each)
    sft_continued_steps: int = 300
    history_loss: bool = True  # see the module docstring
    # SRPO (direct mode), validated every srpo_eval_every steps (the curve; final/ is evaluated)
    srpo_steps: int = 16
    srpo_prompts: int = 32
    srpo_n: int = 8
    srpo_lr: float = 2e-5
    # optimizer steps per rollout batch (the reference's 4): chosen on validation users
    # (benchmarks/RESULTS.md, 2026-12-07): from the default's SFT start, over 3 seeds, 4 updates
    # vs 1 moved validation Recall@10 by +0.0053 [-0.0011, +0.0120]
    srpo_mini_batches: int = 4
    srpo_eval_every: int = 4
    # evaluation: the first eval_users test and validation users (0: all); reasoning mode,
    # ~5x slower per user on a CPU (it writes think_budget tokens first), the first
    # reasoning_users test users
    eval_users: int = 0
    reasoning_users: int = 200
    num_beams: int = 10
    think_budget: int = 256  # covers the CoT responses (think + rewritten history: ~240 tokens)


QUICK = dict(align_passes=1, fusion_per_pass=200, index_iters=5, align_rows=192, cot_rows=48,
             seq_len=512, batch_size=2, sft_align_steps=3, sft_curriculum_steps=3,
             sft_continued_steps=2,
             srpo_steps=1, srpo_prompts=4, srpo_n=4, srpo_eval_every=1, eval_users=12,
             reasoning_users=12,
             num_beams=10,
             think_budget=8)


# full: settings chosen on validation users (benchmarks/RESULTS.md, 2026-12-07). SFT: one
# epoch of the curriculum file, not a quarter (validation Recall@10 0.097 -> 0.116 with 10
# beams; a second epoch of the same rows did not add), then twice the rows for one epoch
# (48,000 alignment + 12,000 CoT rows, 4,000 steps: 0.126 -> 0.137 with 20 beams; three times
# the rows: 0.128; lr 4e-3: 0.130); 20 beams (the top 10 of 20 scored 0.124 where 10 beams
# scored 0.116; 40: no better). SRPO: twice the steps at lr 5e-6, from this SFT start where lr
# 2e-5 lowered validation Recall@10 on two seeds; the control matched to its wall time.
FULL = dict(align_rows=48_000, cot_rows=12_000, sft_curriculum_steps=4000, srpo_steps=32,
            srpo_lr=5e-6, srpo_eval_every=8, sft_continued_steps=500, num_beams=20)
PROFILES = {"quick": QUICK, "default": {}, "full": FULL}


def make_config(out: str, quick: bool = False, device: str = "auto", profile: str | None = None,
                **over) -> DemoConfig:
    """The demo's settings: a profile's sizes (quick=True: the quick profile), then `over`."""
    profile = "quick" if quick else (profile or "default")
    if profile not in PROFILES:
        from gream_fast.errors import InvalidInputError

        raise InvalidInputError(f"--profile: expected one of {', '.join(PROFILES)}, got "
                                f"{profile!r}")
    sizes = dict(PROFILES[profile])
    sizes.update(over)
    return DemoConfig(out=out, profile=profile, device=device, **sizes)


class _Stages:
    """Runs named stages, skipping those whose output exists; keeps their timings."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "timings.json"
        self.timings = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.t0 = time.perf_counter()

    def __call__(self, name: str, done, fn):
        if done():
            print(f"[demo] {name}: done before, reused", flush=True)
            self.timings.setdefault(name, None)
            return
        print(f"[demo] {name} ...", flush=True)
        t = time.perf_counter()
        fn()
        self.timings[name] = round(time.perf_counter() - t, 2)
        print(f"[demo] {name}: {self.timings[name]:.1f} s "
              f"(demo at {time.perf_counter() - self.t0:.0f} s)", flush=True)
        from gream_fast.files import write_json

        write_json(self.path, self.timings)


def _subset(path: Path, n: int, seed: int) -> list:
    from gream_fast.tasks.curriculum import read_rows

    rows = read_rows(path)
    if n >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def popularity(dataset, users: int) -> dict:
    """Items ranked by training-interaction count (ties: lower id), the same top-10 for every
    one of the first `users` test users."""
    from gream_fast.eval.metrics import recall_ndcg

    counts = np.zeros(dataset.num_items, np.int64)
    for u in range(dataset.num_users):
        np.add.at(counts, np.asarray(dataset.train_sequence(u), np.int64), 1)
    top = np.argsort(-counts, kind="stable")[:max(KS)]
    test = dataset.split().test
    n = min(users, len(test)) if users else len(test)
    ranked = np.broadcast_to(top, (n, len(top)))
    return recall_ndcg(ranked, test.target[:n], KS)


def _metrics(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve_svg(title: str, series: list, ylabel: str) -> str:
    """A line chart of [(label, xs, ys), ...]: plain SVG, no plotting dependency."""
    w, h, pad = 560, 260, 48
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    pts_all = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys) if y is not None]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           'font-family="sans-serif" font-size="11">',
           f'<text x="{pad}" y="16">{title}</text>']
    if not pts_all:
        out += [f'<text x="{pad}" y="{h // 2}">no data</text>', "</svg>\n"]
        return "\n".join(out)
    x0, x1 = min(p[0] for p in pts_all), max(p[0] for p in pts_all)
    y0, y1 = min(p[1] for p in pts_all), max(p[1] for p in pts_all)
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    x1 = x1 if x1 > x0 else x0 + 1

    def sx(x):
        return pad + (x - x0) * (w - 2 * pad) / (x1 - x0)

    def sy(y):
        return h - pad - (y - y0) * (h - 2 * pad) / (y1 - y0)

    out.append(f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#888"/>')
    out.append(f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#888"/>')
    out.append(f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end">{y1:.3g}</text>')
    out.append(f'<text x="{pad - 4}" y="{h - pad}" text-anchor="end">{y0:.3g}</text>')
    out.append(f'<text x="{pad}" y="{h - pad + 14}">{x0:g}</text>')
    out.append(f'<text x="{w - pad}" y="{h - pad + 14}" text-anchor="end">{x1:g} (step)</text>')
    out.append(f'<text x="12" y="{h // 2}" transform="rotate(-90 12 {h // 2})" '
               f'text-anchor="middle">{ylabel}</text>')
    for i, (label, xs, ys) in enumerate(series):
        c = colors[i % len(colors)]
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if len(pts) == 1:
            out.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" '
                       f'fill="{c}"/>')
        elif pts:
            line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            out.append(f'<polyline fill="none" stroke="{c}" points="{line}"/>')
        out.append(f'<text x="{w - pad}" y="{30 + 13 * i}" fill="{c}" '
                   f'text-anchor="end">{label}</text>')
    out.append("</svg>\n")
    return "\n".join(out)


def _write_plots(run: Path) -> list:
    a = [m for m in _metrics(run / "sft_align" / "metrics.jsonl") if "loss" in m]
    c = [m for m in _metrics(run / "sft_curriculum" / "metrics.jsonl") if "loss" in m]
    off = a[-1]["step"] if a else 0
    s = [m for m in _metrics(run / "srpo" / "metrics.jsonl") if "reward_mean" in m]
    (run / "sft_loss.svg").write_text(curve_svg(
        "SFT loss per step (curriculum continues after alignment)",
        [("sft_align", [m["step"] for m in a], [m["loss"] for m in a]),
         ("sft_curriculum", [off + m["step"] for m in c], [m["loss"] for m in c])], "loss"))
    (run / "srpo_reward.svg").write_text(curve_svg(
        "SRPO reward mean per step (direct mode)",
        [("reward mean", [m["step"] for m in s], [m["reward_mean"] for m in s])], "reward"))
    v = [m for m in _metrics(run / "srpo" / "metrics.jsonl") if "valid_recall@10" in m]
    (run / "srpo_valid.svg").write_text(curve_svg(
        "SRPO validation Recall@10 (direct mode; step 0 = the SFT model)",
        [("valid recall@10", [m["step"] for m in v], [m["valid_recall@10"] for m in v])],
        "recall@10"))
    return ["sft_loss.svg", "srpo_reward.svg", "srpo_valid.svg"]


def ranking_file(eval_dir: Path, stage: str, mode: str, split: str) -> Path:
    """Where the demo keeps a model's per-user rankings: eval/STAGE/MODE/eval_SPLIT_rankings."""
    return eval_dir / stage / mode / f"eval_{split}_rankings.jsonl"


def _report_md(report: dict, plots: list) -> str:
    st = report["stages"]
    head = "| stage | mode | " + " | ".join(REPORT_KEYS) + " |"
    sz = report["sizes"]
    lines = ["# gream-fast demo report", "",
             f"MovieLens-100K, tiny Qwen3 (`--init tiny`), profile {sz['profile']}, "
             f"{sz['num_beams']} beams; direct mode and popularity on "
             f"{sz['eval_users'] or 'all'} test users, reasoning mode on the first "
             f"{sz['reasoning_users'] or 'all'} (think budget {sz['think_budget']} tokens)"
             + (" (--quick: a smoke run, numbers are noise)" if sz["profile"] == "quick" else "")
             + ".", "", head, "|" + "---|" * (len(REPORT_KEYS) + 2)]
    lines.append("| popularity | - | " + " | ".join(f"{st['popularity'][k]:.4f}"
                                                   for k in REPORT_KEYS) + " |")
    for name in MODEL_STAGES:
        for mode in MODES:
            lines.append(f"| {name} | {mode} | "
                         + " | ".join(f"{st[name][mode][k]:.4f}" for k in REPORT_KEYS) + " |")
    lines += ["", "Validation users (the split settings are chosen on), recall@10:", "",
              "| stage | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
    for name in MODEL_STAGES:
        lines.append(f"| {name} | " + " | ".join(
            f"{report['stages_valid'][name][mode]['recall@10']:.4f}" for mode in MODES) + " |")
    pop, final = st["popularity"]["recall@10"], st["srpo"]["direct"]["recall@10"]
    lines += ["", f"SRPO (direct) against popularity, test Recall@10: {final:.4f} vs {pop:.4f}: "
              + ("beats it." if final > pop else "does NOT beat it.")]
    v = report["srpo_validation"]
    curve = ", ".join(f"step {s}: {r:.4f}" for s, r in v["curve"])
    best = (f"step {v['best_step']} ({v['after']:.4f})" if v["best_step"] else
            "step 0, the starting SFT model itself: no SRPO step raised it")
    lines += ["", "## What SRPO changed", "",
              f"SRPO ran {sz['srpo_steps']} steps of {sz['srpo_prompts']} prompts x "
              f"{sz['srpo_n']} rollouts (direct mode; {sz['srpo_mini_batches']} optimizer "
              f"updates per batch), validated every {sz['srpo_eval_every']} "
              f"steps on {v['users']} validation users (Recall@10 of 20 beams, direct mode): "
              f"{curve}; the "
              f"best was {best}. The `srpo` rows are its final policy (the best on validation "
              "would be an optimistic pick). Test Recall@10 (direct): "
              f"{st['sft_curriculum']['direct']['recall@10']:.4f} (sft_curriculum) -> "
              f"{st['srpo']['direct']['recall@10']:.4f} (srpo).", ""]
    for other, what in (("sft_curriculum", "its start"),
                        ("sft_continued", f"the control: {sz['sft_continued_steps']} more SFT "
                                          "steps from the same start, about SRPO's wall time")):
        lines += [f"Paired on the same users, validation and test pooled by user, srpo - {other} "
                  f"({what}; per-user difference, percentile-bootstrap 95% interval over users; "
                  "an interval that holds 0 is no evidence either way):", ""]
        for mode, c in report[f"srpo_vs_{other}"].items():
            for metric in ("recall@10", "ndcg@10"):
                d = c["diff"][metric]
                lines.append(f"- {mode}, {metric}: {d['mean']:+.4f} [{d['ci95'][0]:+.4f}, "
                             f"{d['ci95'][1]:+.4f}] over {c['users']} users")
        lines.append("")
    lines += ["## Training curves", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Stage timings (seconds; '-' = reused from an earlier run)", "",
              "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {'-' if t is None else f'{t:.1f}'} |" for k, t in report["timings"].items()]
    return "\n".join(lines) + "\n"


def run(cfg: DemoConfig) -> dict:
    """Run (or resume) the demo; returns the report written to OUT/report.json."""
    from gream_fast.files import claim_dir, read_jsonl, write_json, write_jsonl

    run_dir = claim_dir(cfg.out, command="demo", known=("demo_config.json",))
    write_json(run_dir / "demo_config.json", asdict(cfg))
    data, emb, index = run_dir / "ml-100k", run_dir / "emb.safetensors", run_dir / "index"
    align, reason = run_dir / "align.jsonl", run_dir / "reason.jsonl"
    sft_a, sft_c = run_dir / "sft_align.jsonl", run_dir / "sft_curriculum.jsonl"
    stage = _Stages(run_dir)
    print(f"[demo] run folder {run_dir} (profile {cfg.profile})", flush=True)

    def data_stage():
        from gream_fast.data.prepare import PrepareConfig, run as prepare

        prepare(PrepareConfig(out=str(data)))

    def embed_stage():
        from gream_fast.index.embed import EmbedConfig, embed

        embed(EmbedConfig(data=str(data), encoder="minilm", out=str(emb), device=cfg.device))

    def index_stage():
        from gream_fast.index.build import IndexBuildConfig, build

        build(IndexBuildConfig(emb=str(emb), out=str(index), iters=cfg.index_iters,
                               seed=cfg.seed, device=cfg.device))

    def profile_stage():
        from gream_fast.tasks.profile import ProfileConfig, run as profile

        profile(ProfileConfig(data=str(data)))

    def align_stage():
        from gream_fast.tasks.align import AlignConfig, run as align_run

        align_run(AlignConfig(data=str(data), index=str(index), out=str(align),
                              passes=cfg.align_passes, fusion_per_pass=cfg.fusion_per_pass,
                              seed=cfg.seed))

    def reason_stage():
        from gream_fast.tasks.reason import ReasonConfig, run as reason_run

        reason_run(ReasonConfig(data=str(data), index=str(index), out=str(reason), seed=cfg.seed))

    def mix_stage():
        from gream_fast.tasks.curriculum import mix

        a = _subset(align, cfg.align_rows, cfg.seed)
        r = _subset(reason, cfg.cot_rows, cfg.seed + 1)
        write_jsonl(sft_c, mix(a, r, cfg.seed))
        write_jsonl(sft_a, a)  # last: its presence marks the stage done

    stage("data", lambda: (data / "sequences.jsonl").exists(), data_stage)
    stage("embed", emb.exists, embed_stage)
    stage("index", (index / "index.safetensors").exists, index_stage)
    stage("tasks.profile", (data / "profiles.jsonl").exists, profile_stage)
    stage("tasks.align", align.exists, align_stage)
    stage("tasks.reason", reason.exists, reason_stage)
    stage("tasks.mix", sft_a.exists, mix_stage)

    from gream_fast.data.dataset import Dataset

    dataset = Dataset.load(data)
    pop_path = run_dir / "popularity.json"
    stage("popularity", pop_path.exists,
          lambda: write_json(pop_path, popularity(dataset, cfg.eval_users)))

    from gream_fast.train.sft import SFTConfig, train as sft_train

    def sft(out: Path, rows: Path, steps: int, **start):
        def go():
            sft_train(SFTConfig(data=str(rows), out=str(out), index=str(index),
                                data_dir=str(data), seq_len=cfg.seq_len,
                                batch_size=cfg.batch_size, lr=cfg.lr, max_steps=steps,
                                warmup_steps=max(1, steps // 10), seed=cfg.seed,
                                device=cfg.device, save_every=max(steps // 2, 1),
                                history_loss=cfg.history_loss,
                                resume=out.is_dir() and any(out.glob("checkpoint-*")), **start))
        return go

    runs = {name: run_dir / name for name in MODEL_STAGES}
    stage("sft_align", (runs["sft_align"] / "final" / "config.json").exists,
          sft(runs["sft_align"], sft_a, cfg.sft_align_steps, init="tiny",
              tiny_size=cfg.tiny_size))
    stage("sft_curriculum", (runs["sft_curriculum"] / "final" / "config.json").exists,
          sft(runs["sft_curriculum"], sft_c, cfg.sft_curriculum_steps,
              model=str(runs["sft_align"] / "final")))

    def srpo_stage():
        from gream_fast.train.srpo_loop import SRPOConfig, train as srpo_train

        out = runs["srpo"]
        srpo_train(SRPOConfig(model=str(runs["sft_curriculum"] / "final"), data=str(data),
                              index=str(index), out=str(out), mode="direct",
                              steps=cfg.srpo_steps, prompts_per_step=cfg.srpo_prompts,
                              n=cfg.srpo_n, lr=cfg.srpo_lr, mini_batches=cfg.srpo_mini_batches,
                              warmup_steps=max(1, cfg.srpo_steps // 10), seed=cfg.seed,
                              device=cfg.device, save_every=max(cfg.srpo_steps // 2, 1),
                              eval_every=cfg.srpo_eval_every, eval_users=cfg.eval_users,
                              resume=out.is_dir() and any(out.glob("checkpoint-*"))))

    stage("srpo", (runs["srpo"] / "final" / "config.json").exists, srpo_stage)
    stage("sft_continued", (runs["sft_continued"] / "final" / "config.json").exists,
          sft(runs["sft_continued"], sft_c, cfg.sft_continued_steps,
              model=str(runs["sft_curriculum"] / "final")))
    models = {"sft_align": runs["sft_align"] / "final",
              "sft_curriculum": runs["sft_curriculum"] / "final", "srpo": runs["srpo"] / "final",
              "sft_continued": runs["sft_continued"] / "final"}

    # -- evaluation: every (model, mode) on the same validation and test users
    from gream_fast.tasks.context import load_index

    eval_dir = run_dir / "eval"
    sem_index = load_index(index)
    jobs = [(name, mode, split) for name in MODEL_STAGES for mode in MODES
            for split in SPLITS]
    results = {}
    for name in MODEL_STAGES:
        mine = [j for j in jobs if j[0] == name]
        # evaluate() writes the per-user rankings, then the metrics beside them
        paths = {j: ranking_file(eval_dir, *j).with_name(f"eval_{j[2]}_metrics.json")
                 for j in mine}

        def done(j, paths=paths):
            return paths[j].exists() and ranking_file(eval_dir, *j).exists()

        def evaluate_model(name=name, mine=mine, paths=paths, done=done):
            from gream_fast.eval.cli import load_model
            from gream_fast.eval.evaluate import evaluate

            model, tokenizer = load_model(models[name], cfg.device)
            for j in mine:
                if done(j):
                    continue
                users = cfg.eval_users if j[1] == "direct" else cfg.reasoning_users
                print(f"[demo]   eval {name} {j[1]} on {j[2]} ({users or 'all'} users)",
                      flush=True)
                evaluate(model, tokenizer, dataset, sem_index, mode=j[1], split=j[2], ks=KS,
                         num_beams=cfg.num_beams, max_users=users,
                         think_budget=cfg.think_budget, seed=cfg.seed, progress=False,
                         out=paths[j].parent)

        stage(f"eval.{name}", lambda mine=mine, done=done: all(done(j) for j in mine),
              evaluate_model)
        results.update({j: json.loads(p.read_text()) for j, p in paths.items()})

    def pick(m):
        return {k: float(m[k]) for k in REPORT_KEYS}

    pop = json.loads(pop_path.read_text())
    stages = {"popularity": pick(pop)}
    for name in MODEL_STAGES:
        stages[name] = {mode: pick(results[(name, mode, "test")]) for mode in MODES}
    stages_valid = {name: {mode: pick(results[(name, mode, "valid")]) for mode in MODES}
                    for name in MODEL_STAGES}
    sizes = asdict(cfg)
    curriculum_rows = len(read_jsonl(sft_c))
    sft_rows = {"sft_align": len(read_jsonl(sft_a)), "sft_curriculum": curriculum_rows,
                "sft_continued": curriculum_rows}
    valid = [m for m in _metrics(runs["srpo"] / "metrics.jsonl") if "valid_recall@10" in m]
    chosen = json.loads((runs["srpo"] / "best" / "best.json").read_text())
    # the paired comparisons of SRPO with its start and with the control on the same users,
    # validation and test pooled by user (compare: the bootstrap interval of the per-user
    # Recall@10 / NDCG@10 difference)
    from gream_fast.eval.compare import compare

    def paired(other):
        return {mode: compare([ranking_file(eval_dir, "srpo", mode, "test").parent],
                              [ranking_file(eval_dir, other, mode, "test").parent],
                              k=10, splits=SPLITS, seed=cfg.seed) for mode in MODES}
    report = {"stages": stages, "stages_valid": stages_valid,
              "srpo_vs_sft_curriculum": paired("sft_curriculum"),
              "srpo_vs_sft_continued": paired("sft_continued"),
              "srpo_validation": {
                  "metric": "recall@10", "mode": "direct", "users": cfg.eval_users or "all",
                  "before": valid[0]["valid_recall@10"],
                  "after": chosen["metrics"]["valid_recall@10"], "best_step": chosen["step"],
                  "curve": [[m["step"], m["valid_recall@10"]] for m in valid]},
              "sizes": {**sizes, "sft_rows": sft_rows},
              "timings": dict(stage.timings)}
    plots = _write_plots(run_dir)
    write_json(run_dir / "report.json", report)
    (run_dir / "report.md").write_text(_report_md(report, plots))
    print(f"[demo] wrote {run_dir / 'report.md'} and report.json "
          f"(total {time.perf_counter() - stage.t0:.0f} s this run)", flush=True)
    return report


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("demo", help="every stage on MovieLens-100K with the tiny model, "
                                           "then a report (markdown, JSON, SVG curves)")
    p.add_argument("--profile", choices=tuple(PROFILES), default="default",
                   help="quick: a ~2-minute smoke run; default: ~8 minutes on a 2-core CPU; "
                        "full: the settings chosen on validation users, ~20 minutes")
    p.add_argument("--quick", action="store_true", help="the same as --profile quick")
    p.add_argument("--out", default="runs/demo", help="run folder (a rerun resumes it)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--seed", type=int, default=0,
                   help="the seed of every stage (index, data subsets, SFT, SRPO, bootstrap): "
                        "runs with several show the spread that the intervals do not")

    def go(args):
        run(make_config(args.out, args.quick, args.device, profile=args.profile,
                        seed=args.seed))

    p.set_defaults(run=go)


__all__ = ["DemoConfig", "QUICK", "make_config", "run", "popularity", "curve_svg"]
