"""`gream-fast <stage> ...`: the command line. Each stage is a subcommand; more arrive with the
pipeline (data, index build, train, eval, demo)."""
import argparse
import json
import sys
from pathlib import Path

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gream-fast", description=__doc__)
    stages = parser.add_subparsers(dest="stage", required=True)

    index = stages.add_parser("index", help="semantic ID indexes").add_subparsers(
        dest="action", required=True)
    p = index.add_parser("stats", help="print an index's size, collisions and trie footprint")
    p.add_argument("path", type=Path, help="X.index.json (reference format) or .safetensors")
    p.set_defaults(run=index_stats)
    p = index.add_parser("convert", help="convert between X.index.json and .safetensors")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path, help="output; .json writes the reference format")
    p.set_defaults(run=index_convert)
    for p in index.choices.values():
        p.add_argument("--codebook-size", type=int, default=None,
                       help="K for an .index.json input (the file does not record it; default: "
                            "the largest code in the file)")
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
