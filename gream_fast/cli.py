"""`gream-fast <stage> ...`: the command line. Each stage is a subcommand; more arrive with the
pipeline (data, index build, train, eval, demo)."""
import argparse
import json
import sys
from pathlib import Path

from gream_fast.config import add_fields, from_args
from gream_fast.errors import GreamError


def _load_index(path: Path, codebook_size: int | None):
    from gream_fast.index import SemanticIndex

    if path.name.endswith(".json"):
        return SemanticIndex.from_index_json(path, codebook_size)
    return SemanticIndex.load(path)


def index_stats(args) -> None:
    from gream_fast.index import PrefixTrie

    index = _load_index(args.path, args.codebook_size)
    trie = PrefixTrie(index.sid_codes())
    stats = {
        "items": index.num_items,
        "levels": index.num_levels,
        "codebook_size": index.codebook_size,
        "collisions": index.num_collisions,
        "max_sid_len": index.max_len,
        "trie_nodes": trie.num_nodes,
        "trie_bytes": trie.memory_bytes(),
    }
    print(json.dumps(stats, indent=2))


def index_convert(args) -> None:
    index = _load_index(args.src, args.codebook_size)
    if args.dst.name.endswith(".json"):
        index.to_index_json(args.dst)
    else:
        index.save(args.dst)
    print(f"wrote {args.dst} ({index.num_items} items)")


def data_prepare(args) -> None:
    from gream_fast.data.prepare import PrepareConfig, run

    cfg = from_args(PrepareConfig, args)
    p = run(cfg)
    s = p.stats
    print(f"wrote {cfg.out}: {s['num_users']} users, {s['num_items']} items, "
          f"{s['num_interactions']} interactions (sparsity {s['sparsity']:.4f}; dropped "
          f"{s['dropped']}; {sum(s['bad_lines'].values())} bad lines skipped) in {s['seconds']} s")


def data_synth(args) -> None:
    import dataclasses
    import json

    from gream_fast.data.prepare import prepare, write
    from gream_fast.data.synth import SynthConfig, synthesize, write_amazon2014

    cfg = from_args(SynthConfig, args)
    raw = synthesize(cfg)
    if args.as_amazon2014:
        write_amazon2014(raw, args.out)
        print(f"wrote Amazon-2014-format files to {args.out} ({len(raw.users)} ratings, "
              f"{len(raw.meta)} metadata lines; category 'Synthetic')")
        return
    p = prepare(raw, args.k_core)
    p.stats["synth"] = dataclasses.asdict(cfg)
    write(p, args.out)
    print(f"wrote {args.out}: {json.dumps({k: p.stats[k] for k in ('num_users', 'num_items', 'num_interactions')})}")


def tasks_align(args) -> None:
    from gream_fast.tasks.align import AlignConfig, run

    rows = run(from_args(AlignConfig, args))
    print(f"wrote {args.out}: {len(rows)} rows")


def tasks_profile(args) -> None:
    from gream_fast.tasks.profile import ProfileConfig, run

    profiles = run(from_args(ProfileConfig, args))
    print(f"wrote {len(profiles)} user profiles beside {args.data}"
          + (" and item_texts.jsonl" if args.items else ""))


def tasks_reason(args) -> None:
    from gream_fast.tasks.reason import ReasonConfig, run

    rows, stats = run(from_args(ReasonConfig, args))
    print(f"wrote {args.out}: {len(rows)} CoT rows ({stats})")


def tasks_mix(args) -> None:
    from gream_fast.tasks.curriculum import run

    n = run(args.align, args.reason, args.out, args.seed)
    print(f"wrote {args.out}: {n} rows in curriculum order")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gream-fast", description=__doc__)
    stages = parser.add_subparsers(dest="stage", required=True)

    from gream_fast.data.prepare import PrepareConfig
    from gream_fast.data.readers import FORMATS
    from gream_fast.data.synth import SynthConfig

    data = stages.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    p = data.add_parser("prepare", help="raw logs -> clean k-core sequences + item texts")
    add_fields(p, PrepareConfig, required=("out",), choices={"format": FORMATS}, help={
        "input": "folder with the raw files; none with --format recbole: the built-in MovieLens-100K",
        "category": "Amazon category (Instruments, Beauty, Sports, ... or the full file name); "
                    "RecBole dataset name when it differs from the folder's",
        "skip_bad_lines": "count and report malformed lines instead of stopping at the first",
        "out": "output folder (replaced as a whole when the run succeeds)"})
    p.set_defaults(run=data_prepare)
    p = data.add_parser("synth", help="a synthetic dataset with planted structure")
    add_fields(p, SynthConfig)
    p.add_argument("--k-core", type=int, default=5)
    p.add_argument("--as-amazon2014", action="store_true",
                   help="write raw Amazon 2014 files (ratings CSV + literal metadata) instead")
    p.add_argument("--out", required=True)
    p.set_defaults(run=data_synth)

    from gream_fast.tasks.align import AlignConfig
    from gream_fast.tasks.profile import ProfileConfig
    from gream_fast.tasks.reason import ReasonConfig

    tasks = stages.add_parser("tasks", help="SFT data: alignment, profiles, reasoning, curriculum")
    tasks = tasks.add_subparsers(dest="action", required=True)
    p = tasks.add_parser("align", help="the six alignment tasks as chat rows")
    add_fields(p, AlignConfig, required=("data", "index", "out"), help={
        "data": "a `data prepare` folder", "index": "index folder or file (.index.json, .safetensors)",
        "tasks": "comma-separated subset of the six tasks"})
    p.set_defaults(run=tasks_align)
    p = tasks.add_parser("profile", help="user preference and intent texts from a teacher")
    add_fields(p, ProfileConfig, required=("data",), choices={"teacher": ("template", "openai")},
               help={"teacher": "template (offline) or openai (OPENAI_BASE_URL, OPENAI_API_KEY, "
                                "GREAM_TEACHER_MODEL)"})
    p.set_defaults(run=tasks_profile)
    p = tasks.add_parser("reason", help="CoT samples with three reasoning steps")
    add_fields(p, ReasonConfig, required=("data", "index", "out"),
               choices={"teacher": ("template", "openai"), "rewrite": ("copy", "denoise")})
    p.set_defaults(run=tasks_reason)
    p = tasks.add_parser("mix", help="the three-part curriculum order of alignment and CoT rows")
    p.add_argument("--align", required=True)
    p.add_argument("--reason", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=tasks_mix)

    index = stages.add_parser("index", help="semantic ID indexes").add_subparsers(
        dest="action", required=True)
    from gream_fast.index.build import add_cli as add_build
    from gream_fast.index.embed import add_cli as add_embed

    p = index.add_parser("stats", help="print an index's size, collisions and trie footprint")
    p.add_argument("path", type=Path, help="X.index.json (reference format) or .safetensors")
    p.set_defaults(run=index_stats)
    p = index.add_parser("convert", help="convert between X.index.json and .safetensors")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path, help="output; .json writes the reference format")
    p.set_defaults(run=index_convert)
    for p in [index.choices["stats"], index.choices["convert"]]:
        p.add_argument("--codebook-size", type=int, default=None,
                       help="K for an .index.json input (the file does not record it; default: "
                            "the largest code in the file)")
    add_embed(index)
    add_build(index)

    from gream_fast.eval.cli import add_cli as add_eval

    add_eval(stages)  # eval, recommend
    from gream_fast.train.cli import add_cli as add_train

    add_train(stages)  # train sft
    from gream_fast.demo import add_cli as add_demo

    add_demo(stages)  # demo
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except GreamError as e:
        print(f"gream-fast: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
