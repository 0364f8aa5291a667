"""`gream-fast eval` (metrics of a model on a dataset split) and `gream-fast recommend` (top-k
items for one history). Torch and transformers are imported when a command runs, not when the
parser is built."""
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from gream_fast.config import check_ranges
from gream_fast.errors import FormatError, InvalidInputError
from gream_fast.model.index_record import INDEX_MISMATCH_HELP, check_pairing


@dataclass
class EvalConfig:
    model: str = ""
    data: str = ""
    index: str = ""
    mode: str = "direct"
    split: str = "test"
    ks: str = "1,5,10"
    num_beams: int = 10
    batch_size: int = 16
    score: str = "full"
    out: str = ""
    device: str = "auto"
    dtype: str = "auto"
    max_history: int = 20
    max_users: int = 0
    system_prompt: bool = True
    think_budget: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    allow_index_mismatch: bool = False


@dataclass
class RecommendConfig:
    model: str = ""
    index: str = ""
    history: str = ""
    top_k: int | None = None  # None: num_beams
    num_beams: int = 10
    data: str = ""
    score: str = "full"
    device: str = "auto"
    dtype: str = "auto"
    max_history: int = 20
    system_prompt: bool = True
    allow_index_mismatch: bool = False


def load_model(path, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) from a local Hugging Face causal-LM folder, offline, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach the Hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gream_fast.index.embed import resolve_device, resolve_dtype

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FormatError(f"--model {p}: not a Hugging Face model folder (no config.json)")
    dev = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for a bad folder
        raise FormatError(f"--model {p}: cannot load its tokenizer ({e})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True,
                                                     dtype=resolve_dtype(dtype, dev))
    except Exception as e:
        raise FormatError(f"--model {p}: cannot load it as a causal LM ({e})") from None
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise FormatError(f"--model {p}: the embeddings have {rows} rows but the tokenizer "
                          f"{len(tokenizer)} tokens: resize them (add_sid_tokens(tokenizer, "
                          "model, index=...)) and save both")
    return model.eval().to(dev), tokenizer


def parse_ints(text: str, flag: str) -> list:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InvalidInputError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not out:
        raise InvalidInputError(f"{flag}: expected at least one integer, got {text!r}")
    return out


def run_eval(cfg: EvalConfig) -> dict:
    from gream_fast.data.dataset import Dataset
    from gream_fast.eval.evaluate import check_mode, evaluate
    from gream_fast.files import claim_dir, write_json
    from gream_fast.tasks.context import load_index

    check_mode(cfg.mode)  # before loading anything
    ks = parse_ints(cfg.ks, "--ks")
    check_ranges(cfg, at_least={"num_beams": max(ks), "batch_size": 1, "max_history": 1,
                                "max_users": 0, "think_budget": 0},
                 fractions=("top_p",))
    if cfg.out:
        claim_dir(cfg.out, command="eval", inputs=[cfg.model, cfg.data, cfg.index],
                  known=tuple(f"eval_{s}_metrics.json" for s in ("test", "valid")))
    data, index = Dataset.load(cfg.data), load_index(cfg.index)
    check_pairing(cfg.model, index, index_name=f"--index {cfg.index}",
                  allow_mismatch=cfg.allow_index_mismatch)
    model, tokenizer = load_model(cfg.model, cfg.device, cfg.dtype)
    metrics = evaluate(model, tokenizer, data, index, cfg.mode, cfg.split, ks, cfg.num_beams,
                       cfg.batch_size, cfg.score, cfg.out or None, max_history=cfg.max_history,
                       max_users=cfg.max_users or None, system_prompt=cfg.system_prompt,
                       think_budget=cfg.think_budget, temperature=cfg.temperature,
                       top_p=cfg.top_p, seed=cfg.seed)
    if cfg.out:
        write_json(Path(cfg.out) / f"eval_{cfg.split}_config.json", asdict(cfg))
    return metrics


def item_titles(data_dir, index, index_name) -> list:
    """Each item's title from a `data prepare` folder describing the index's items."""
    from gream_fast.data.dataset import Dataset

    data = Dataset.load(data_dir)
    if data.num_items != index.num_items:
        raise InvalidInputError(f"--data {data_dir} has {data.num_items} items but --index "
                                f"{index_name} {index.num_items}: they must describe the same "
                                "items")
    return [it.get("title", "") for it in data.items]


def run_recommend(cfg: RecommendConfig) -> list:
    """[(item, score, title or None)], best first."""
    from gream_fast.eval.evaluate import SeqRecPrompts, build_constraint
    from gream_fast.generate import recommend
    from gream_fast.model import make_runner
    from gream_fast.tasks.context import load_index

    history = parse_ints(cfg.history, "--history")
    if cfg.top_k is None:
        cfg.top_k = cfg.num_beams
    check_ranges(cfg, at_least={"num_beams": 1, "top_k": 1, "max_history": 1})
    if cfg.top_k > cfg.num_beams:
        raise InvalidInputError(f"--top-k: expected at most --num-beams ({cfg.num_beams}), got "
                                f"{cfg.top_k}")
    index = load_index(cfg.index)
    check_pairing(cfg.model, index, index_name=f"--index {cfg.index}",
                  allow_mismatch=cfg.allow_index_mismatch)
    bad = [i for i in history if not 0 <= i < index.num_items]
    if bad:
        raise InvalidInputError(f"--history: item {bad[0]} is not in the index "
                                f"(0..{index.num_items - 1})")
    titles = item_titles(cfg.data, index, cfg.index) if cfg.data else None
    model, tokenizer = load_model(cfg.model, cfg.device, cfg.dtype)
    prompts = SeqRecPrompts(tokenizer, index, cfg.system_prompt)
    runner = make_runner(model)
    constraint = build_constraint(tokenizer, index, prompts, runner.device)
    items, scores = recommend(model, tokenizer, constraint, [prompts(history[-cfg.max_history:])],
                              num_beams=cfg.num_beams, top_k=cfg.top_k, score=cfg.score,
                              runner=runner)
    return [(int(i), float(s), titles[int(i)] if titles else None)
            for i, s in zip(items[0].tolist(), scores[0].tolist())]


def add_cli(subparsers) -> None:
    """Register `eval`, `recommend` and `compare` on the top-level `gream-fast` subparsers."""
    from gream_fast.config import add_fields, from_args
    from gream_fast.eval.evaluate import MODES, SPLITS

    common = {
        "model": "local Hugging Face causal-LM folder; its tokenizer must have the SID tokens",
        "index": "index folder or file (.index.json, .safetensors) of the model's items",
        "score": "full: log-probs over the whole vocabulary (as HF generate); sid: normalised "
                 "over the level's SID tokens (faster, may rank differently)",
        "device": "auto (cuda when available), cpu, cuda, cuda:N",
        "dtype": "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16",
        "max_history": "history items in the prompt (the last ones; METHOD.md: 20)",
        "system_prompt": "start the prompt with the alignment tasks' system prompt (as "
                         "`tasks align` does unless --no-system-prompt)",
        "allow_index_mismatch": INDEX_MISMATCH_HELP}
    p = subparsers.add_parser("eval", help="Recall@K / NDCG@K of a model on a dataset split")
    add_fields(p, EvalConfig, required=("model", "data", "index"),
               choices={"mode": MODES, "split": SPLITS, "score": ("full", "sid")},
               help={**common,
                     "data": "a `data prepare` folder",
                     "mode": "direct: beam search over SIDs; reasoning: think, then beam "
                             "search after <answer>",
                     "think_budget": "reasoning: thinking tokens before <answer> is forced",
                     "temperature": "reasoning: sampling temperature of the thinking (0: greedy)",
                     "ks": "comma-separated cutoffs K",
                     "num_beams": "beams per user, at least max(ks); the ranking is the beams",
                     "batch_size": "users per beam-search batch",
                     "out": "run folder: eval_SPLIT_rankings.jsonl, _metrics.json, _config.json",
                     "max_users": "evaluate only the first N users (0: all)"})

    def eval_main(args):
        metrics = run_eval(from_args(EvalConfig, args))
        print(json.dumps(metrics, indent=2))

    p.set_defaults(run=eval_main)

    p = subparsers.add_parser("recommend", help="top-k items for one history")
    add_fields(p, RecommendConfig, required=("model", "index", "history"),
               choices={"score": ("full", "sid")},
               help={**common,
                     "history": "item ids, oldest first, comma-separated (e.g. 3,17,42)",
                     "top_k": "items to print (at most --num-beams; default: all of them)",
                     "data": "a `data prepare` folder: print the items' titles too"})

    def recommend_main(args):
        rows = run_recommend(from_args(RecommendConfig, args))
        print("rank\titem\tscore" + ("\ttitle" if rows[0][2] is not None else ""))
        for r, (item, score, title) in enumerate(rows, 1):
            print(f"{r}\t{item}\t{score:.4f}" + (f"\t{title}" if title is not None else ""))

    p.set_defaults(run=recommend_main)

    p = subparsers.add_parser(
        "compare", help="paired bootstrap comparison of two evaluated models on the same users")
    for name in ("a", "b"):
        p.add_argument(name, metavar=f"RUN_{name.upper()}",
                       help="an evaluation folder (gream-fast eval --out), or several separated "
                            "by commas (seeds: averaged user by user)")
    p.add_argument("--k", type=int, default=10, help="Recall@K and NDCG@K")
    p.add_argument("--splits", default="valid,test",
                   help="splits pooled by user (each user's metric is its mean over them)")
    p.add_argument("--samples", type=int, default=10_000, help="bootstrap resamples of the users")
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    p.add_argument("--out", type=Path, default=None, help="also write the result to this JSON file")

    def compare_main(args):
        from gream_fast.eval.compare import compare
        from gream_fast.files import check_output, write_json

        runs = {n: [Path(f) for f in getattr(args, n).split(",") if f] for n in ("a", "b")}
        if args.out is not None:
            check_output(args.out, command="compare", inputs=runs["a"] + runs["b"],
                         folder=False, flag="--out")
        result = compare(runs["a"], runs["b"], k=args.k, splits=args.splits.split(","),
                         samples=args.samples, seed=args.seed)
        if args.out is not None:
            write_json(args.out, result)
        print(json.dumps(result, indent=2))

    p.set_defaults(run=compare_main)
