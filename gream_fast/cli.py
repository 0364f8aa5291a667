"""`gream-fast <stage> ...`: the command line. Each stage is a subcommand; more arrive with the
pipeline (data, index build, train, eval, demo)."""
import argparse
import json
import signal
import sys
import threading
import warnings
from pathlib import Path

from gream_fast.config import add_fields, from_args
from gream_fast.errors import GreamError


def index_stats(args) -> None:
    from gream_fast.index import PrefixTrie, load_index

    index = load_index(args.path, args.codebook_size)
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
    from gream_fast.files import check_output
    from gream_fast.index import load_index

    check_output(args.dst, command="index convert", inputs=[args.src], folder=False,
                 flag="DST")
    index = load_index(args.src, args.codebook_size)
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
    for key, what in (("invalid_utf8_lines", "lines with invalid UTF-8 (read with U+FFFD)"),
                      ("duplicate_items", "duplicate item records (the first kept)")):
        for path, count in s.get(key, {}).items():
            if count:
                print(f"  {path}: {count} {what}")


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
    p.add_argument("path", type=Path, help="X.index.json (reference format), .safetensors, or "
                                           "an index folder")
    p.set_defaults(run=index_stats)
    p = index.add_parser("convert", help="convert between X.index.json and .safetensors")
    p.add_argument("src", type=Path, help="X.index.json, .safetensors, or an index folder")
    p.add_argument("dst", type=Path, help="output; .json writes the reference format")
    p.set_defaults(run=index_convert)
    for p in [index.choices["stats"], index.choices["convert"]]:
        p.add_argument("--codebook-size", type=int, default=None,
                       help="K for an .index.json input (the file does not record it; default: "
                            "the largest code in the file)")
    add_embed(index)
    add_build(index)

    from gream_fast.eval.cli import add_cli as add_eval

    add_eval(stages)  # eval, recommend, compare
    from gream_fast.train.cli import add_cli as add_train

    add_train(stages)  # train sft
    from gream_fast.demo import add_cli as add_demo

    add_demo(stages)  # demo
    from gream_fast.serve.cli import add_cli as add_serve

    add_serve(stages)  # serve, bench-serve
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup runs (temporaries removed)."""


def _terminate(signum, frame):
    raise Terminated()


def _warning(message, category, filename, lineno, file=None, line=None):
    print(f"gream-fast: warning: {message}", file=file or sys.stderr)


# Exit codes: 0 done; 1 the machine refused (a file system or memory error); 2 a mistake in the
# command or its inputs (a GreamError, or argparse's usage errors); 130 Ctrl-C; 143 SIGTERM.
def main(argv=None) -> int:
    """Run one command. The one place where errors become messages and exit codes: the
    command's own errors are GreamErrors raised where the fault is found, naming the file,
    line, field or flag; what reaches here is printed as one line, never a traceback, except
    a bug of ours (anything else), whose traceback is what a report needs."""
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    show = warnings.showwarning
    warnings.showwarning = _warning
    try:
        args.run(args)
    except Terminated:
        print("gream-fast: terminated (SIGTERM); outputs are whole or absent, temporaries "
              "removed", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("gream-fast: interrupted; outputs are whole or absent, temporaries removed",
              file=sys.stderr)
        return 130
    except GreamError as e:
        print(f"gream-fast: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no: name the path and the reason
        where = f"{e.filename}: " if e.filename else ""
        print(f"gream-fast: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except MemoryError:
        print("gream-fast: error: out of memory (try smaller batches or inputs)", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = show
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
