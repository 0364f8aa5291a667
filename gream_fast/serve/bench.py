"""`gream-fast bench-serve`: load a running `gream-fast serve` the way serving benchmarks do
(sglang.bench_serving, FlashRec): N requests per concurrency level, closed loop (each of C
clients sends its next request when the last one is answered) or, with --request-rate, Poisson
arrivals capped at C in flight. Per level: req/s, items/s, latency p50/p90/p95/p99/max,
goodput (answers within --slo-ms per second), the server's own queue / compute split and mean
wave size. Every answer is checked against the index: distinct real items whose SIDs match,
scores non-increasing, the index fingerprint the same; --check-against-offline also compares
the items with in-process recommend() on the same histories.

What bounds it: the server's waves (one beam search per wave); the client's threads share the
machine with the server, as they would on one host."""
import http.client
import ipaddress
import json
import math
import socket
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from gream_fast.errors import InvalidInputError

MAX_REQUESTS = 1_000_000
MAX_CONCURRENCY = 1024


@dataclass
class BenchServeConfig:
    url: str = "http://127.0.0.1:8000"
    index: str = ""
    data: str = ""
    split: str = "test"
    synthetic: bool = False
    num_requests: int = 200
    concurrency: str = "1,2,4,8,16"
    request_rate: float = 0.0  # requests/s (Poisson); 0: closed loop
    slo_ms: float = 1000.0
    top_k: int = 10
    num_beams: int = 0  # 0: the server's default
    mode: str = "direct"
    max_history: int = 20
    timeout_s: float = 60.0
    warmup: int = 8
    seed: int = 0
    allow_remote: bool = False
    check_against_offline: bool = False
    model: str = ""  # for --check-against-offline
    out: str = ""


def check_url(url: str, allow_remote: bool) -> tuple:
    """(host, port) of an http:// URL; loopback only unless allow_remote."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise InvalidInputError(f"--url: expected http://HOST:PORT, got {url!r}")
    try:
        port = parts.port or 80
    except ValueError:
        raise InvalidInputError(f"--url: bad port in {url!r}") from None
    if not allow_remote:
        try:
            addrs = {ai[4][0] for ai in socket.getaddrinfo(parts.hostname, port)}
        except socket.gaierror as e:
            raise InvalidInputError(f"--url: cannot resolve {parts.hostname!r} ({e})") from None
        if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
            raise InvalidInputError(f"--url: {parts.hostname} is not this machine; pass "
                                    "--allow-remote to load a remote server")
    return parts.hostname, port


class Client:
    """One keep-alive HTTP/1.1 connection (one per client thread)."""

    def __init__(self, host, port, timeout):
        self.host, self.port, self.timeout = host, port, timeout
        self.conn = None

    def request(self, method, path, body=None):
        payload = None if body is None else json.dumps(body).encode()
        for attempt in (0, 1):  # a kept-alive connection the server closed: reconnect once
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, payload,
                                  {"Content-Type": "application/json"} if payload else {})
                r = self.conn.getresponse()
                data = r.read()
                return r.status, json.loads(data) if data else None
            except Exception as e:  # the connection's state is unknown: never reuse it
                self.conn.close()
                self.conn = None
                retry = isinstance(e, (http.client.RemoteDisconnected, ConnectionResetError,
                                       BrokenPipeError))
                if attempt or not retry:
                    raise
        raise AssertionError("unreachable")


def check_answer(body, request_id, top_k, index, fingerprint) -> tuple:
    """(invalid items, problems) of one 200 answer: each item a distinct real item whose SID
    matches the index, top_k of them, finite scores best first, our request's id and index."""
    try:
        items = body["items"]
        problems, invalid, seen = [], 0, set()
        for it in items:
            i = it["item"]
            ok = (type(i) is int and 0 <= i < index.num_items and i not in seen
                  and it.get("sid") == list(index.sid(i)))
            invalid += not ok
            seen.add(i)
        if len(items) != top_k:
            problems.append(f"{len(items)} items, expected {top_k}")
        scores = [float(it["score"]) for it in items]
        if not all(math.isfinite(v) for v in scores):
            problems.append("a score is not finite")
        if any(a < b for a, b in zip(scores, scores[1:])):
            problems.append("scores increase")
        if body["index"]["fingerprint"] != fingerprint:
            problems.append("another index fingerprint")
        if body["request_id"] != request_id:
            problems.append("another request's answer")
    except (KeyError, TypeError, ValueError) as e:
        return 0, [f"malformed answer ({type(e).__name__}: {e})"]
    return invalid, problems


@dataclass
class Level:
    concurrency: int
    requests: int = 0
    ok: int = 0
    seconds: float = 0.0
    latencies: list = field(default_factory=list)  # seconds, answered requests
    statuses: dict = field(default_factory=dict)
    invalid_items: int = 0
    bad_answers: int = 0
    changed_answers: int = 0  # items differ from an earlier answer for the same history
    items: int = 0
    queue_ms: list = field(default_factory=list)
    compute_ms: list = field(default_factory=list)
    batch_sizes: list = field(default_factory=list)

    def summary(self, slo_ms: float) -> dict:
        lat = np.array(self.latencies) * 1e3
        pct = {f"p{q}_ms": round(float(np.percentile(lat, q)), 2) if len(lat) else None
               for q in (50, 90, 95, 99)}
        good = int((lat <= slo_ms).sum())
        mean = (lambda v: round(statistics.fmean(v), 3) if v else None)
        return {"concurrency": self.concurrency, "requests": self.requests, "ok": self.ok,
                "seconds": round(self.seconds, 3),
                "req_per_s": round(self.ok / self.seconds, 3),
                "items_per_s": round(self.items / self.seconds, 1),
                **pct, "max_ms": round(float(lat.max()), 2) if len(lat) else None,
                "goodput_req_per_s": round(good / self.seconds, 3),
                "server_queue_ms": mean(self.queue_ms), "server_compute_ms": mean(self.compute_ms),
                "mean_batch_size": mean(self.batch_sizes),
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "invalid_items": self.invalid_items, "bad_answers": self.bad_answers,
                "changed_answers": self.changed_answers}


def histories(cfg: BenchServeConfig, num_items: int) -> list:
    if cfg.synthetic == bool(cfg.data):
        raise InvalidInputError("bench-serve: give --data DIR (its --split users' histories) "
                                "or --synthetic (random histories), one of them")
    if cfg.synthetic:
        rng = np.random.default_rng(cfg.seed)
        lo = min(5, cfg.max_history)
        return [rng.integers(0, num_items, int(rng.integers(lo, cfg.max_history + 1))).tolist()
                for _ in range(min(cfg.num_requests, 10_000))]
    from gream_fast.data.dataset import Dataset

    data = Dataset.load(cfg.data)
    if data.num_items != num_items:
        raise InvalidInputError(f"--data {cfg.data} has {data.num_items} items but the index "
                                f"{num_items}")
    if cfg.split not in ("valid", "test"):
        raise InvalidInputError(f"--split: expected valid or test, got {cfg.split!r}")
    ex = getattr(data.split(max_history=cfg.max_history), cfg.split)
    if len(ex) == 0:
        raise InvalidInputError(f"--data {cfg.data}: the {cfg.split} split has no users")
    return [list(map(int, ex[e][1])) for e in range(len(ex))]


def run_level(cfg, host, port, conc, hist, index, fingerprint, answers) -> Level:
    """One concurrency level. answers {history index: (item, score) list}: the first answer
    for each history (filled in here); a later one with other items counts as changed.
    Latency runs from the request's scheduled arrival with --request-rate (so a capped
    concurrency shows as waiting, not hidden), from its sending otherwise."""
    lv, lock = Level(conc), threading.Lock()
    n = cfg.num_requests
    starts = None
    if cfg.request_rate > 0:  # Poisson arrival times
        gaps = np.random.default_rng(cfg.seed + conc).exponential(1 / cfg.request_rate, n)
        starts = np.cumsum(gaps) - gaps[0]
    counter = iter(range(n))
    t0 = time.monotonic()

    def worker():
        client = Client(host, port, cfg.timeout_s)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            s = time.monotonic()
            if starts is not None:
                s = t0 + starts[i]
                time.sleep(max(0.0, s - time.monotonic()))
            h = i % len(hist)
            rid = f"bench-{conc}-{i}"
            body = {"history": hist[h], "top_k": cfg.top_k, "mode": cfg.mode, "request_id": rid}
            if cfg.num_beams:
                body["num_beams"] = cfg.num_beams
            try:
                status, reply = client.request("POST", "/v1/recommend", body)
                status = str(status)
            except (OSError, http.client.HTTPException, ValueError):
                status, reply = "connection_error", None
            took = time.monotonic() - s
            with lock:
                lv.requests += 1
                lv.statuses[status] = lv.statuses.get(status, 0) + 1
                if status != "200":
                    continue
                invalid, problems = check_answer(reply, rid, cfg.top_k, index, fingerprint)
                lv.ok += 1
                lv.latencies.append(took)
                lv.invalid_items += invalid
                lv.bad_answers += bool(problems or invalid)
                if problems:
                    continue
                lv.items += len(reply["items"])
                t = reply.get("timing", {})
                lv.queue_ms.append(t.get("queue_ms", 0.0))
                lv.compute_ms.append(t.get("compute_ms", 0.0))
                lv.batch_sizes.append(t.get("batch_size", 0))
                got = [(it["item"], it["score"]) for it in reply["items"]]
                first = answers.setdefault(h, got)
                lv.changed_answers += [i for i, _ in first] != [i for i, _ in got]

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lv.seconds = time.monotonic() - t0
    return lv


def offline_check(cfg, hist, answers, index, server: dict) -> dict:
    """The served items vs in-process recommend() on the same histories, prompts, beams and
    scoring as the server's (direct mode): mismatched item lists and the largest score
    difference."""
    from gream_fast.eval.cli import load_model
    from gream_fast.eval.evaluate import SeqRecPrompts, build_constraint
    from gream_fast.generate import recommend
    from gream_fast.model import make_runner

    model, tok = load_model(cfg.model, dtype=server["dtype"])
    prompts = SeqRecPrompts(tok, index, server["system_prompt"])
    runner = make_runner(model)
    con = build_constraint(tok, index, prompts, runner.device)
    beams = cfg.num_beams or server["num_beams"]
    keys = sorted(answers)[:64]
    mismatched, worst = 0, 0.0
    for lo in range(0, len(keys), 16):
        chunk = keys[lo:lo + 16]
        texts = [prompts(hist[h][-server["max_history"]:]) for h in chunk]
        items, scores = recommend(model, tok, con, texts, num_beams=beams, top_k=beams,
                                  score=server["score"], runner=runner)
        for h, it, sc in zip(chunk, items.tolist(), scores.tolist()):
            served = answers[h]
            mismatched += [i for i, _ in served] != it[:cfg.top_k]
            worst = max([worst] + [abs(a[1] - b) for a, b in zip(served, sc)])
    return {"histories": len(keys), "mismatched": mismatched, "max_score_diff": worst}


def run_bench(cfg: BenchServeConfig, log=print) -> dict:
    from gream_fast.eval.cli import parse_ints
    from gream_fast.tasks.context import load_index

    host, port = check_url(cfg.url, cfg.allow_remote)
    levels = parse_ints(cfg.concurrency, "--concurrency")
    if not 1 <= cfg.num_requests <= MAX_REQUESTS:
        raise InvalidInputError(f"--num-requests: expected 1..{MAX_REQUESTS}, got "
                                f"{cfg.num_requests}")
    if not all(1 <= c <= MAX_CONCURRENCY for c in levels):
        raise InvalidInputError(f"--concurrency: expected levels in 1..{MAX_CONCURRENCY}")
    if not (cfg.timeout_s > 0 and cfg.slo_ms > 0 and cfg.request_rate >= 0):
        raise InvalidInputError("--timeout-s and --slo-ms: expected > 0; --request-rate >= 0")
    if cfg.check_against_offline and (not cfg.model or cfg.mode != "direct"):
        raise InvalidInputError("--check-against-offline: needs --model (the served model) and "
                                "--mode direct")
    index = load_index(cfg.index)
    probe = Client(host, port, cfg.timeout_s)
    try:
        status, info = probe.request("GET", "/v1/info")
        ready, _ = probe.request("GET", "/ready")
    except OSError as e:
        raise InvalidInputError(f"--url {cfg.url}: no server answers ({e})") from None
    if status != 200 or ready != 200:
        raise InvalidInputError(f"--url {cfg.url}: the server is not ready (/ready {ready})")
    fingerprint = info["index"]["fingerprint"]
    if fingerprint != index.fingerprint():
        raise InvalidInputError(f"--index {cfg.index}: fingerprint {index.fingerprint()} but the "
                                f"server's index is {fingerprint}")
    hist = histories(cfg, index.num_items)
    for i in range(cfg.warmup):  # untimed: connections, allocator, the first waves
        status, reply = probe.request("POST", "/v1/recommend", {
            "history": hist[i % len(hist)], "top_k": cfg.top_k, "mode": cfg.mode,
            **({"num_beams": cfg.num_beams} if cfg.num_beams else {})})
        if status != 200:  # e.g. top_k above the server's beams: every request would fail
            raise InvalidInputError(f"--url {cfg.url}: a warm-up request got {status}: "
                                    f"{json.dumps(reply)[:300]}")
    rows, answers = [], {}
    for c in levels:
        lv = run_level(cfg, host, port, c, hist, index, fingerprint, answers)
        rows.append(lv.summary(cfg.slo_ms))
        log(format_row(rows[-1], header=len(rows) == 1))
    result = {"bench": "serve", "url": cfg.url, "server": {k: info.get(k) for k in
                                                           ("device", "versions", "config")},
              "config": asdict(cfg), "histories": len(hist), "levels": rows}
    if cfg.check_against_offline:
        result["offline"] = offline_check(cfg, hist, answers, index, info["config"])
        log(f"offline recommend(): {result['offline']}")
    if len(rows) > 1 and rows[0]["req_per_s"] > 0:
        result["scaling"] = round(rows[-1]["req_per_s"] / rows[0]["req_per_s"], 2)
        log(f"throughput at concurrency {rows[-1]['concurrency']} / at {rows[0]['concurrency']}"
            f": {result['scaling']}x")
    if cfg.out:
        from gream_fast.files import write_json

        write_json(Path(cfg.out), result)
        log(f"wrote {cfg.out}")
    return result


COLUMNS = (("concurrency", "conc"), ("ok", "ok"), ("req_per_s", "req/s"),
           ("items_per_s", "items/s"), ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"),
           ("p99_ms", "p99 ms"), ("max_ms", "max ms"), ("goodput_req_per_s", "goodput/s"),
           ("server_queue_ms", "queue ms"), ("server_compute_ms", "compute ms"),
           ("mean_batch_size", "batch"), ("invalid_items", "invalid"), ("bad_answers", "bad"))


def format_row(row: dict, header: bool = False) -> str:
    line = "  ".join(f"{row[k]!s:>10}" for k, _ in COLUMNS)
    if not header:
        return line
    return "  ".join(f"{h:>10}" for _, h in COLUMNS) + "\n" + line


def add_bench_cli(subparsers) -> None:
    from gream_fast.config import add_fields, from_args

    p = subparsers.add_parser("bench-serve", help="load a running `gream-fast serve`: "
                                                  "throughput, latency percentiles, checks")
    add_fields(p, BenchServeConfig, required=("index",),
               choices={"mode": ("direct", "reasoning"), "split": ("valid", "test")}, help={
                   "url": "the server (loopback only unless --allow-remote)",
                   "index": "the served index (answers are checked against it)",
                   "data": "a `data prepare` folder: its --split users' histories",
                   "synthetic": "random histories instead of --data",
                   "num_requests": "requests per concurrency level",
                   "concurrency": "comma-separated levels: clients (closed loop) or the cap "
                                  "on requests in flight (with --request-rate)",
                   "request_rate": "Poisson arrivals at this rate (requests/s); 0: closed loop",
                   "slo_ms": "goodput counts answers within this latency",
                   "num_beams": "beams per request (0: the server's default)",
                   "timeout_s": "client-side timeout of one request",
                   "warmup": "untimed requests before the first level",
                   "check_against_offline": "compare the items with in-process recommend() "
                                            "(needs --model; direct mode)",
                   "out": "also write the result as JSON to this file"})

    def main(args):
        run_bench(from_args(BenchServeConfig, args))

    p.set_defaults(run=main)
