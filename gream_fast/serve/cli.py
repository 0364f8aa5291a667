"""`gream-fast serve` and `gream-fast bench-serve`."""
from dataclasses import asdict, dataclass

from gream_fast.errors import InvalidInputError


@dataclass
class ServeConfig:
    model: str = ""
    index: str = ""
    data: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    num_beams: int = 10
    allowed_beams: str = ""  # comma-separated; default: num_beams only
    score: str = "full"
    max_batch_size: int = 32
    max_batch_rows: int = 1024
    static_batches: str = "auto"
    max_wait_ms: float = 2.0
    max_queue: int = 256
    max_history: int = 20
    max_history_items: int = 10_000
    max_batch_requests: int = 64
    max_body_bytes: int = 1 << 20
    timeout_ms: int = 30_000
    max_timeout_ms: int = 600_000
    think_budget: int = 128
    think_temperature: float = 0.0
    system_prompt: bool = True
    allow_index_mismatch: bool = False
    grace_s: float = 30.0
    seed: int = 0


def allowed_beams(cfg: ServeConfig) -> tuple:
    from gream_fast.eval.cli import parse_ints

    beams = parse_ints(cfg.allowed_beams, "--allowed-beams") if cfg.allowed_beams else []
    if cfg.num_beams not in beams:
        beams.append(cfg.num_beams)
    bad = [b for b in beams if b < 1]
    if bad:
        raise InvalidInputError(f"--allowed-beams: expected beam counts >= 1, got {bad[0]}")
    return tuple(sorted(set(beams)))


def build_server(cfg: ServeConfig, log=print):
    """(engine, app, socket, url) for `cfg`: everything checked that can be before loading."""
    from gream_fast.config import check_ranges
    from gream_fast.serve.app import bind, build_app, serving_lifespan, url_of
    from gream_fast.serve.backend import BackendConfig, RecommenderBackend
    from gream_fast.serve.engine import Engine, EngineLimits
    from gream_fast.serve.metrics import Metrics
    from gream_fast.serve.protocol import SCORES, Limits
    from gream_fast.tasks.context import load_index

    if not 0 <= cfg.port <= 65535:
        raise InvalidInputError(f"--port: expected 0..65535, got {cfg.port}")
    check_ranges(cfg, at_least={"num_beams": 1, "max_batch_size": 1, "max_batch_rows": 1,
                                "max_queue": 1, "max_history": 1, "max_history_items": 1,
                                "max_batch_requests": 1, "max_body_bytes": 64, "timeout_ms": 1,
                                "max_timeout_ms": 1, "think_budget": 0, "port": 0,
                                "max_wait_ms": 0, "grace_s": 0, "think_temperature": 0})
    if cfg.score not in SCORES:
        raise InvalidInputError(f"--score: expected one of {', '.join(SCORES)}, got {cfg.score!r}")
    if cfg.timeout_ms > cfg.max_timeout_ms:
        raise InvalidInputError(f"--timeout-ms: {cfg.timeout_ms} is above --max-timeout-ms "
                                f"{cfg.max_timeout_ms}")
    beams = allowed_beams(cfg)
    if beams[-1] > cfg.max_batch_rows:
        raise InvalidInputError(f"--max-batch-rows: {cfg.max_batch_rows} cannot hold one "
                                f"request of {beams[-1]} beams")
    if cfg.max_batch_requests > cfg.max_queue:
        raise InvalidInputError(f"--max-batch-requests: {cfg.max_batch_requests} is more than "
                                f"--max-queue {cfg.max_queue}: such a batch could never be queued")
    index = load_index(cfg.index)  # fails fast, before binding, on a bad --index
    num_items = index.num_items
    if beams[-1] > num_items:
        raise InvalidInputError(f"--allowed-beams: {beams[-1]} beams, but the index has "
                                f"{num_items} items")
    backend = RecommenderBackend(BackendConfig(
        cfg.model, cfg.index, cfg.data, cfg.device, cfg.dtype, cfg.system_prompt,
        cfg.allow_index_mismatch, cfg.think_budget, cfg.think_temperature, cfg.seed,
        warmup_beams=beams, max_history=cfg.max_history, max_batch_size=cfg.max_batch_size,
        max_batch_rows=cfg.max_batch_rows,
        static_batches={"auto": None, "on": True, "off": False}[cfg.static_batches]), index)
    metrics = Metrics()
    engine = Engine(backend, EngineLimits(cfg.max_batch_size, cfg.max_batch_rows,
                                          cfg.max_wait_ms, cfg.max_queue), metrics)
    limits = Limits(num_items, cfg.num_beams, beams, cfg.max_history, cfg.max_history_items,
                    cfg.max_batch_requests, cfg.timeout_ms, cfg.max_timeout_ms, cfg.score)
    sock = bind(cfg.host, cfg.port)
    url = url_of(sock)
    app = build_app(engine, backend, limits, metrics, cfg.max_body_bytes, asdict(cfg),
                    serving_lifespan(engine, cfg.grace_s, url, log))
    return engine, app, sock, url


def run_serve(cfg: ServeConfig, log=print) -> None:
    from gream_fast.serve.app import run_server

    def say(message):
        log(message, flush=True)

    engine, app, sock, url = build_server(cfg, say)
    say(f"gream-fast serve: listening on {url} (loading {cfg.model})")
    run_server(engine, app, sock, cfg.grace_s, say)
    say("gream-fast serve: stopped")


def add_cli(subparsers) -> None:
    from gream_fast.config import add_fields, from_args
    from gream_fast.serve.bench import add_bench_cli

    p = subparsers.add_parser("serve", help="an HTTP recommendation server (batched beam "
                                            "search, backpressure, Prometheus metrics)")
    add_fields(p, ServeConfig, required=("model", "index"), choices={"score": ("full", "sid"),
                                                     "static_batches": ("auto", "on", "off")},
               help={
                   "model": "local Hugging Face causal-LM folder (a trained GREAM model)",
                   "index": "index folder or file (.index.json, .safetensors) of its items",
                   "data": "a `data prepare` folder: item titles in the responses",
                   "host": "address to bind (127.0.0.1: this machine only)",
                   "port": "TCP port (0: any free one; the URL is printed)",
                   "device": "auto (cuda when available), cpu, cuda, cuda:N",
                   "dtype": "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16",
                   "num_beams": "beams of a request that does not say (its items: the beams)",
                   "allowed_beams": "comma-separated beam counts a request may ask (each is "
                                    "warmed up); default: --num-beams only",
                   "score": "default ranking: full (as HF generate) or sid (level-normalised)",
                   "max_batch_size": "prompts per wave at most",
                   "max_batch_rows": "beam rows (prompts x beams) per wave at most",
                   "static_batches": "a KV pool sized for the largest wave at start-up, "
                                     "direct-mode waves padded to batch buckets, one CUDA graph "
                                     "per (beams, bucket) captured at warm-up, none after: auto "
                                     "(on CUDA), on, off",
                   "max_wait_ms": "how long the oldest request waits for others to join its wave",
                   "max_queue": "requests waiting at most; more get 429 + Retry-After",
                   "max_history": "history items the model sees (the last ones; longer "
                                  "histories are cut and the response says by how many)",
                   "max_history_items": "longer histories are refused (413)",
                   "max_batch_requests": "requests per /v1/recommend/batch at most (else 413)",
                   "max_body_bytes": "larger bodies get 413",
                   "timeout_ms": "a request's deadline unless it sets timeout_ms (then 504)",
                   "max_timeout_ms": "the largest timeout_ms a request may set",
                   "think_budget": "reasoning mode: thinking tokens before <answer> is forced",
                   "think_temperature": "reasoning mode: 0 thinks greedily (same history, "
                                        "same answer)",
                   "system_prompt": "start prompts with the alignment tasks' system prompt",
                   "grace_s": "on SIGTERM: seconds the requests in flight get to finish",
                   "seed": "reasoning mode with --think-temperature > 0: the sampling seed"})

    def serve_main(args):
        run_serve(from_args(ServeConfig, args))

    p.set_defaults(run=serve_main)
    add_bench_cli(subparsers)
