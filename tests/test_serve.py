"""`gream-fast serve` and `bench-serve` on a tiny random Qwen3 over loopback: the request
validation (every error row of the API), waves that batch, answers equal to offline
recommend(), metrics that add up, 429 under a flood with no accepted request lost, deadlines,
hostile bodies, a SIGTERM that drains, and bench-serve's checks."""
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette")  # the serve extra (requirements-serve.txt; make installs it)
pytest.importorskip("prometheus_client")

from gream_fast.serve.protocol import Limits, ServeError, decode_json, parse_batch, parse_request  # noqa: E402
from tiny_data import make_data_and_index, make_tiny_model  # noqa: E402

LIMITS = Limits(num_items=14, num_beams=4, allowed_beams=(2, 4), max_history=5,
                max_history_items=50, max_batch_requests=3, timeout_ms=1000,
                max_timeout_ms=5000)


# -- the protocol, no server --------------------------------------------------------------------
@pytest.mark.parametrize("body, status, field, says", [
    (b"{", 400, None, "not valid JSON"),
    ('{"history": [1]}'.encode("utf-16"), 400, None, "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, 400, None, "nested too deeply"),
    (b'{"history": [NaN]}', 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "expected a JSON object"),
    (b'{"history": [1], "topk": 3}', 400, "topk", "unknown field"),
    (b'{"top_k": 3}', 400, "history", "required"),
    (b'{"history": "1,2"}', 400, "history", "list of item ids"),
    (b'{"history": []}', 400, "history", "at least one"),
    (b'{"history": [1, 2.0]}', 400, "history[1]", "integer item id"),
    (b'{"history": [true]}', 400, "history[0]", "integer item id"),
    (b'{"history": [3, 14]}', 400, "history[1]", "item 14 is not in the index (0..13)"),
    (b'{"history": [3, -1]}', 400, "history[1]", "item -1 is not in the index"),
    (b'{"history": [1], "top_k": 0}', 400, "top_k", "expected 1..4"),
    (b'{"history": [1], "top_k": 3, "num_beams": 2}', 400, "top_k", "expected 1..2"),
    (b'{"history": [1], "num_beams": 3}', 400, "num_beams", "expected one of [2, 4]"),
    (b'{"history": [1], "mode": "fast"}', 400, "mode", "expected one of"),
    (b'{"history": [1], "score": 1}', 400, "score", "expected one of"),
    (b'{"history": [1], "request_id": ""}', 400, "request_id", "printable string"),
    (b'{"history": [1], "timeout_ms": 0}', 400, "timeout_ms", "expected 1..5000"),
    (b'{"history": [1], "timeout_ms": 9999}', 400, "timeout_ms", "expected 1..5000"),
    (json.dumps({"history": [1] * 51}).encode(), 413, "history", "51 items, at most 50"),
])
def test_bad_requests_are_named(body, status, field, says):
    with pytest.raises(ServeError) as e:
        parse_request(decode_json(body), LIMITS)
    assert (e.value.status, e.value.field) == (status, field)
    assert says in e.value.message
    assert e.value.body()["error"]["retryable"] is False


def test_good_requests_default_and_cut_long_histories():
    r = parse_request({"history": [1, 2]}, LIMITS)
    assert (r.top_k, r.num_beams, r.mode, r.score, r.timeout_ms) == (4, 4, "direct", "full", 1000)
    assert len(r.request_id) == 32 and r.dropped == 0
    r = parse_request({"history": list(range(9)), "top_k": 2, "num_beams": 2, "mode":
                       "reasoning", "request_id": "u-1"}, LIMITS)
    assert r.history == [4, 5, 6, 7, 8] and r.dropped == 4  # the last max_history items
    assert r.key == ("reasoning", 2, "full") and r.request_id == "u-1"


def test_batch_bodies():
    assert [r.history for r in parse_batch({"requests": [{"history": [1]}, {"history": [2]}]},
                                           LIMITS)] == [[1], [2]]
    cases = [({"requests": []}, 400, "requests"),
             ({"requests": [{"history": [1]}] * 4}, 413, "requests"),
             ({"requests": [{"history": [1]}, {"history": [99]}]}, 400, "requests[1].history[0]"),
             ({"requests": [{"history": [1], "request_id": "a"}] * 2}, 400, "requests"),
             ({"reqs": []}, 400, "reqs")]
    for body, status, field in cases:
        with pytest.raises(ServeError) as e:
            parse_batch(body, LIMITS)
        assert (e.value.status, e.value.field) == (status, field), body


# -- a live server on loopback ------------------------------------------------------------------
class Gate:
    """The real backend, with a gate the test can close to hold the engine inside a wave."""

    def __init__(self, backend):
        self.backend, self.open, self.inside = backend, threading.Event(), threading.Event()
        self.open.set()
        self.waves = []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run(self, histories, *args):
        self.waves.append(len(histories))
        self.inside.set()
        assert self.open.wait(30)
        return self.backend.run(histories, *args)

    @contextlib.contextmanager
    def held(self):
        """Closed for the block (the next wave waits inside run()); open again after it, even
        when an assertion fails."""
        self.open.clear()
        self.inside.clear()
        try:
            yield
        finally:
            self.open.set()


@pytest.fixture(scope="module", autouse=True)
def torch_kernels():
    """The server as users run it on a CPU: the kernels' torch references, not Triton's
    interpreter (the kernels are tested against those references in their own tests)."""
    from gream_fast.kernels import _backend

    before, _backend.INTERPRET = _backend.INTERPRET, False
    yield
    _backend.INTERPRET = before


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data, index = make_data_and_index(root, users=30)
    make_tiny_model(root, index)
    return root, data, index


def start(root, **overrides):
    """A server in this process (uvicorn in a thread, port 0): (url, engine, gate, server)."""
    from gream_fast.serve.app import make_server
    from gream_fast.serve.cli import ServeConfig, build_server

    cfg = ServeConfig(model=str(root / "model"), index=str(root / "index"),
                      data=str(root / "data"), port=0, device="cpu", num_beams=4,
                      allowed_beams="2,4", max_history=5, max_wait_ms=30, max_queue=8,
                      max_batch_requests=4, max_body_bytes=4096, think_budget=4,
                      **overrides)
    engine, app, sock, url = build_server(cfg, log=lambda *a, **k: None)
    engine.backend = gate = Gate(engine.backend)
    server = make_server(engine, app, 1.0, log=lambda *a, **k: None)
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 120
    while engine.state != "ready":
        assert engine.state not in ("failed", "stopped"), engine.error
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return url, engine, gate, server


@pytest.fixture(scope="module")
def live(assets):
    # static batches (a CUDA server's default) on the CPU: the KV pool and the wave padding
    # serve every live test; the CUDA graphs themselves are tested in test_kv_pool (on CUDA)
    url, engine, gate, server = start(assets[0], static_batches="on", max_batch_size=8)
    yield url, engine, gate
    server.should_exit = True


def call(url, method, path, body=None, raw=None, headers=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, data, headers or {})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    ctype = r.getheader("content-type", "")
    return r.status, (json.loads(payload) if "json" in ctype else payload.decode()), r


def metric(url, name, **labels) -> float:
    text = call(url, "GET", "/metrics")[1]
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    return sum(float(v) for v in re.findall("^" + pat + "$", text, re.M))


def test_answers_equal_offline_recommend(live, assets):
    from gream_fast.eval.evaluate import SeqRecPrompts, build_constraint
    from gream_fast.generate import recommend

    url, engine, _ = live
    root, data, index = assets
    histories = [[0, 3, 5], [7], [1, 2, 3, 4, 5, 6, 8]]
    b = engine.backend.backend
    prompts = SeqRecPrompts(b.tokenizer, index)
    con = build_constraint(b.tokenizer, index, prompts, "cpu")
    items, scores = recommend(b.model, b.tokenizer, con, [prompts(h[-5:]) for h in histories],
                              num_beams=4, top_k=4)
    for h, it, sc in zip(histories, items.tolist(), scores.tolist()):
        status, body, _ = call(url, "POST", "/v1/recommend", {"history": h, "top_k": 3})
        assert status == 200, body
        assert [x["item"] for x in body["items"]] == it[:3]
        assert [x["score"] for x in body["items"]] == pytest.approx(sc[:3], abs=1e-5)
        for x in body["items"]:
            assert x["sid"] == list(index.sid(x["item"]))
            assert x["title"] == data.items[x["item"]]["title"]
        assert body["history_dropped"] == max(0, len(h) - 5)
        assert body["index"]["fingerprint"] == index.fingerprint()


def test_static_batches_pad_waves_to_the_buckets_warmed_up(live, assets):
    # warm-up ran one wave per batch bucket (1, 2, 4, 8 prompts) in the KV pool; a wave of 3
    # runs padded to 4 in that bucket's state and answers as offline recommend() does
    from gream_fast.eval.evaluate import SeqRecPrompts, build_constraint
    from gream_fast.generate import recommend
    from gream_fast.serve.backend import batch_buckets

    url, engine, _ = live
    root, data, index = assets
    b = engine.backend.backend
    assert batch_buckets(8, 1024, 4) == [1, 2, 4, 8] and batch_buckets(32, 40, 10) == [1, 2, 4]
    assert batch_buckets(5, 1024, 2) == [1, 2, 4, 5]
    assert sorted(b.pool.states) == [1, 2, 4, 8]  # reasoning waves run outside the pool
    states, misses = dict(b.pool.states), b.pool.misses
    histories = [[0, 3, 5], [7, 8], [1, 2, 3, 4, 5, 6, 8]]
    status, body, _ = call(url, "POST", "/v1/recommend/batch",
                           {"requests": [{"history": h} for h in histories]})
    assert status == 200, body
    prompts = SeqRecPrompts(b.tokenizer, index)
    con = build_constraint(b.tokenizer, index, prompts, "cpu")
    items, scores = recommend(b.model, b.tokenizer, con, [prompts(h[-5:]) for h in histories],
                              num_beams=4, top_k=4)
    for answer, it, sc in zip(body["responses"], items.tolist(), scores.tolist()):
        assert answer["timing"]["batch_size"] == 3
        assert [x["item"] for x in answer["items"]] == it
        assert [x["score"] for x in answer["items"]] == pytest.approx(sc, abs=1e-5)
    assert b.pool.states == states and b.pool.misses == misses  # the bucket-4 state, reused
    pool = call(url, "GET", "/v1/info")[1]["kv_pool"]
    assert pool["prompts"] == 8 and pool["rows"] == 1024 and pool["misses"] == misses == 0
    assert pool["prompt_len"] == b.longest_prompt() >= len(b.tokenizer(
        prompts(histories[2][-5:]), add_special_tokens=False)["input_ids"])
    assert pool["batch_buckets"] == {"2": [1, 2, 4, 8], "4": [1, 2, 4, 8]}
    assert pool["bytes"] == b.pool.nbytes() > 0
    assert metric(url, "gream_cuda_graph_captures") == 0  # CPU: no graphs
    assert metric(url, "gream_decode_eager_steps") == 0


def test_waves_batch_concurrent_requests_and_metrics_add_up(live):
    url, engine, gate = live
    before = {s: metric(url, "gream_requests_total", endpoint="recommend", status=s)
              for s in ("200", "400")}
    waves_before = metric(url, "gream_batch_size_count")
    prompts_before = metric(url, "gream_batch_size_sum")
    items_before = metric(url, "gream_items_returned_total")
    recs_before = metric(url, "gream_recommendations_total", status="200")
    # hold the engine in a first wave while six more requests queue
    with gate.held(), ThreadPoolExecutor(8) as pool:
        first = pool.submit(call, url, "POST", "/v1/recommend", {"history": [1]})
        assert gate.inside.wait(30)
        rest = [pool.submit(call, url, "POST", "/v1/recommend",
                            {"history": [i, i + 1], "top_k": 2}) for i in range(6)]
        bad = pool.submit(call, url, "POST", "/v1/recommend", {"history": [99]})
        deadline = time.monotonic() + 30
        while engine.queue_depth < 6:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gate.open.set()
        answers = [first.result()] + [f.result() for f in rest]
        assert bad.result()[0] == 400
    assert all(s == 200 for s, _, _ in answers)
    sizes = [b["timing"]["batch_size"] for _, b, _ in answers[1:]]
    assert sizes == [6] * 6  # the six queued requests ran as one wave
    assert gate.waves[-2:] == [1, 6]
    assert metric(url, "gream_requests_total", endpoint="recommend", status="200") == \
        before["200"] + 7
    assert metric(url, "gream_requests_total", endpoint="recommend", status="400") == \
        before["400"] + 1
    assert metric(url, "gream_batch_size_count") == waves_before + 2
    assert metric(url, "gream_batch_size_sum") == prompts_before + 7
    assert metric(url, "gream_items_returned_total") == items_before + 4 + 6 * 2
    assert metric(url, "gream_recommendations_total", status="200") == recs_before + 7
    assert metric(url, "gream_invalid_items_total") == 0
    assert metric(url, "gream_queue_depth") == 0


def test_flood_gets_429_and_loses_no_accepted_request(live):
    url, engine, gate = live
    n = 20  # max_queue is 8: one running, eight waiting, the rest refused
    with gate.held(), ThreadPoolExecutor(n) as pool:
        first = pool.submit(call, url, "POST", "/v1/recommend", {"history": [2]})
        assert gate.inside.wait(30)
        flood = [pool.submit(call, url, "POST", "/v1/recommend", {"history": [i % 14]})
                 for i in range(n - 1)]
        deadline = time.monotonic() + 30
        while sum(f.done() for f in flood) < n - 1 - 8:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, body, _ = call(url, "GET", "/ready")
        assert status == 503 and body["reasons"] == ["queue_full"]
        gate.open.set()
        results = [first.result()] + [f.result() for f in flood]
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) == 1 + 8 and statuses.count(429) == n - 1 - 8
    for s, body, r in results:
        if s == 429:
            assert body["error"]["code"] == "overloaded" and body["error"]["retryable"]
            assert int(r.getheader("Retry-After")) >= 1
        else:
            assert len(body["items"]) == 4
    assert call(url, "GET", "/ready")[0] == 200


def test_deadline_passes_504(live):
    url, engine, gate = live
    with gate.held(), ThreadPoolExecutor(2) as pool:
        first = pool.submit(call, url, "POST", "/v1/recommend", {"history": [3]})
        assert gate.inside.wait(30)
        late = call(url, "POST", "/v1/recommend", {"history": [4], "timeout_ms": 50})
        gate.open.set()
        assert first.result()[0] == 200
    status, body, _ = late
    assert status == 504 and body["error"]["code"] == "deadline_exceeded"
    assert body["error"]["retryable"] is True
    assert call(url, "POST", "/v1/recommend", {"history": [4]})[0] == 200


def test_hostile_bodies_get_4xx_and_the_server_keeps_serving(live):
    url = live[0]
    big = b'{"history": [' + b"1, " * 3000 + b"1]}"  # past max_body_bytes (4096)
    cases = [(call(url, "POST", "/v1/recommend", raw=big), 413),
             (call(url, "POST", "/v1/recommend", raw=b"[" * 3000), 400),
             (call(url, "POST", "/v1/recommend", raw=b"\xff\xfe{\x00}\x00"), 400),
             (call(url, "POST", "/v1/recommend", raw=b"not json"), 400),
             (call(url, "GET", "/v1/recommend"), 405),
             (call(url, "GET", "/v2/nothing"), 404),
             (call(url, "POST", "/v1/recommend/batch", {"requests": [{"history": [1]}] * 5}), 413)]
    for (status, body, _), want in cases:
        assert status == want, body
        assert set(body["error"]) == {"code", "message", "field", "retryable"}
    assert cases[4][0][2].getheader("Allow") == "POST"
    # Starlette's own answers are counted too
    assert metric(url, "gream_requests_total", endpoint="other", status="404") >= 1
    assert metric(url, "gream_requests_total", endpoint="recommend", status="405") >= 1
    # a chunked body that streams past the limit: no Content-Length to refuse it early
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: application/json\r\n\r\n")
        for _ in range(3):
            s.sendall(b"800\r\n" + b" " * 0x800 + b"\r\n")
        s.sendall(b"0\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 413")
    status, body, _ = call(url, "POST", "/v1/recommend/batch",
                           {"requests": [{"history": [1], "top_k": 1},
                                         {"history": [2, 3], "num_beams": 2}]})
    assert status == 200 and [len(r["items"]) for r in body["responses"]] == [1, 2]
    assert call(url, "GET", "/health")[0] == 200
    info = call(url, "GET", "/v1/info")[1]
    assert info["state"] == "ready" and info["limits"]["allowed_beams"] == [2, 4]
    assert info["index"]["num_items"] == 14 and "torch" in info["versions"]


def test_bench_serve_checks_every_answer(live, assets):
    from gream_fast import InvalidInputError
    from gream_fast.serve.bench import BenchServeConfig, run_bench

    url = live[0]
    root = assets[0]
    cfg = BenchServeConfig(url=url, index=str(root / "index"), synthetic=True, num_requests=12,
                           concurrency="1,4", top_k=4, warmup=1, check_against_offline=True,
                           model=str(root / "model"), out=str(root / "bench.json"))
    res = run_bench(cfg, log=lambda *a: None)
    assert [lv["ok"] for lv in res["levels"]] == [12, 12]
    assert all(lv["invalid_items"] == 0 and lv["bad_answers"] == 0 for lv in res["levels"])
    assert res["offline"]["mismatched"] == 0 and res["offline"]["max_score_diff"] < 1e-4
    assert json.loads((root / "bench.json").read_text())["levels"][1]["concurrency"] == 4
    with pytest.raises(InvalidInputError, match="not this machine"):
        run_bench(BenchServeConfig(url="http://10.11.12.13:80", index=str(root / "index"),
                                   synthetic=True))


def test_sigterm_drains_and_exits_0(assets):
    root = assets[0]
    cmd = [sys.executable, "-m", "gream_fast.cli", "serve", "--model", str(root / "model"),
           "--index", str(root / "index"), "--port", "0", "--device", "cpu", "--num-beams", "4",
           "--think-budget", "400", "--max-wait-ms", "0", "--max-batch-size", "2"]
    # the server as users run it: compiled kernels or torch, not Triton's interpreter
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        url = None
        for line in proc.stdout:
            m = re.search(r"ready at (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, proc.stderr.read()
        # slow requests (reasoning, 400 thinking tokens, two per wave): SIGTERM comes while
        # one wave runs and others wait; every accepted request is still answered
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(call, url, "POST", "/v1/recommend",
                                   {"history": [i, i + 1], "mode": "reasoning"})
                       for i in range(6)]
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        assert [s for s, _, _ in results] == [200] * 6
        assert max(b["timing"]["queue_ms"] for _, b, _ in results) > 500  # queued at SIGTERM
        assert proc.wait(60) == 0
        out = proc.stdout.read()
        assert "draining" in out and "stopped" in out
        with pytest.raises(OSError):  # no longer listening
            call(url, "GET", "/health")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_setup_is_an_error_not_a_traceback(assets, tmp_path, capsys):
    from gream_fast.cli import main

    root = assets[0]
    assert main(["serve", "--model", str(tmp_path), "--index", str(root / "index"),
                 "--port", "0"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["serve", "--model", str(root / "model"), "--index", str(root / "index"),
                 "--allowed-beams", "4,2000", "--max-batch-rows", "100"]) == 2
    assert "--max-batch-rows: 100 cannot hold one request of 2000 beams" in \
        capsys.readouterr().err
    assert main(["serve", "--model", str(root / "model"), "--index", str(tmp_path / "none")]) == 2


# -- the engine alone, on a stand-in backend (the engine's logic; the model's is above) ---------
class Echo:
    """A backend whose answer for a history is its items reversed, padded: deterministic and
    checkable. It can fail, or block until released."""

    def __init__(self, fail_load=False):
        self.fail_load, self.waves = fail_load, []
        self.release = threading.Event()
        self.release.set()
        self.fail_next = False

    def load(self):
        if self.fail_load:
            raise OSError("no such model")

    def warmup(self):
        pass

    def run(self, histories, mode, beams, score):
        import numpy as np

        self.waves.append((len(histories), mode, beams, score))
        assert self.release.wait(30)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        items = np.array([(h[::-1] * beams)[:beams] for h in histories])
        return items, -np.arange(beams, dtype=float)[None].repeat(len(histories), 0)


def echo_engine(backend=None, on_fail=None, **limits):
    from gream_fast.serve.engine import Engine, EngineLimits
    from gream_fast.serve.metrics import Metrics

    engine = Engine(backend or Echo(), EngineLimits(**{"max_wait_ms": 20, **limits}), Metrics(),
                    on_fail=on_fail)
    engine.start()
    deadline = time.monotonic() + 10
    while engine.state not in ("ready", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return engine


def req(history, beams=4, mode="direct", top_k=None, timeout_ms=5000):
    return parse_request({"history": history, "num_beams": beams, "mode": mode,
                          "top_k": top_k or beams, "timeout_ms": timeout_ms},
                         Limits(100, 4, (2, 4, 8), 20, 100, 4, 5000, 10000))


def test_engine_waves_group_by_key_and_respect_the_limits():
    backend = Echo()
    engine = echo_engine(backend, max_batch_size=3, max_batch_rows=16, max_queue=32)
    backend.release.clear()
    first = engine.submit(req([1]))
    while not backend.waves:
        time.sleep(0.005)
    jobs = [engine.submit(req([i, i + 1], beams=b, mode=m))
            for i, (b, m) in enumerate([(4, "direct"), (2, "direct"), (4, "direct"),
                                        (4, "reasoning"), (4, "direct"), (4, "direct"),
                                        (8, "direct"), (8, "direct"), (8, "direct")])]
    backend.release.set()
    answers = [j.future.result(10) for j in [first] + jobs]
    assert answers[1].items == [1, 0, 1, 0]  # each history's own answer
    assert answers[5].items == [5, 4, 5, 4] and answers[5].scores == [0.0, -1.0, -2.0, -3.0]
    # the oldest's key first, then by age: 3 prompts of 4 beams (max_batch_size), the fourth
    # next; 8 beams: 2 rows of 8 fill max_batch_rows=16
    assert backend.waves[1:] == [(3, "direct", 4, "full"), (1, "direct", 2, "full"),
                                 (1, "reasoning", 4, "full"), (1, "direct", 4, "full"),
                                 (2, "direct", 8, "full"), (1, "direct", 8, "full")]
    assert engine.stop(5)


def test_engine_drains_fails_a_wave_and_reports_a_failed_load():
    backend = Echo()
    engine = echo_engine(backend, max_queue=4)
    backend.fail_next = True
    with pytest.raises(ServeError) as e:
        engine.submit(req([1])).future.result(10)
    assert e.value.status == 500 and "boom" in e.value.message
    assert engine.submit(req([2])).future.result(10).items[0] == 2  # the engine lives on
    backend.release.clear()
    running = engine.submit(req([3]))
    while len(backend.waves) < 3:
        time.sleep(0.005)
    queued = engine.submit(req([4]))
    engine.drain()
    with pytest.raises(ServeError) as e:
        engine.submit(req([5]))
    assert e.value.status == 503 and e.value.retryable
    backend.release.set()
    assert engine.stop(5)  # everything accepted was answered
    assert running.future.result(1).items[0] == 3 and queued.future.result(1).items[0] == 4

    backend = Echo()  # past the grace period what is still queued gets 503, not silence
    engine = echo_engine(backend)
    backend.release.clear()
    running = engine.submit(req([1]))
    while not backend.waves:
        time.sleep(0.005)
    queued = engine.submit(req([2]))
    assert engine.stop(0.2) is False
    with pytest.raises(ServeError, match="shut down"):
        queued.future.result(1)
    backend.release.set()
    assert running.future.result(10).items[0] == 1

    failed = []  # a load error: the engine says so (the server exits with it)
    engine = echo_engine(Echo(fail_load=True), on_fail=failed.append)
    assert engine.state == "failed" and isinstance(engine.error, OSError) and failed
    with pytest.raises(ServeError) as e:
        engine.submit(req([1]))
    assert e.value.status == 503


class Loading(Echo):
    """Echo that loads only when told to, with what the app reads from a backend."""

    def __init__(self):
        super().__init__()
        self.loaded = threading.Event()
        self.sids, self.titles, self.fingerprint, self.device = [["<a>"]] * 100, None, "f", "cpu"

    def load(self):
        assert self.loaded.wait(30)


def test_http_503_while_loading_and_draining_500_on_a_failed_wave():
    """The statuses the live server above never reaches, over loopback: 503 (retryable, with
    Retry-After) while loading and while draining, 500 (JSON) when a wave fails, and the
    server answers again after the failure."""
    from gream_fast.serve.app import bind, build_app, make_server, url_of
    from gream_fast.serve.engine import Engine, EngineLimits
    from gream_fast.serve.metrics import Metrics

    backend, metrics = Loading(), Metrics()
    engine = Engine(backend, EngineLimits(max_wait_ms=1), metrics)
    app = build_app(engine, backend, Limits(100, 4, (4,), 20, 100, 4, 5000, 10000), metrics,
                    4096)
    sock = bind("127.0.0.1", 0)
    url = url_of(sock)
    server = make_server(engine, app, 1.0, log=lambda *a, **k: None)
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while True:  # the server listens before the model is loaded
            try:
                status, body, _ = call(url, "GET", "/ready")
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert status == 503 and body["reasons"] == ["loading"]
        status, body, r = call(url, "POST", "/v1/recommend", {"history": [1, 2, 3, 4]})
        assert status == 503 and body["error"]["code"] == "not_ready"
        assert body["error"]["retryable"] and int(r.getheader("Retry-After")) >= 1
        backend.loaded.set()
        while engine.state != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        backend.fail_next = True
        status, body, _ = call(url, "POST", "/v1/recommend", {"history": [1, 2, 3, 4]})
        assert status == 500 and body["error"]["code"] == "internal"
        status, body, _ = call(url, "POST", "/v1/recommend", {"history": [1, 2, 3, 4]})
        assert status == 200 and [x["item"] for x in body["items"]] == [4, 3, 2, 1]
        engine.drain()
        status, body, _ = call(url, "GET", "/ready")
        assert status == 503 and body["reasons"] == ["draining"]
        status, body, _ = call(url, "POST", "/v1/recommend", {"history": [1, 2, 3, 4]})
        assert status == 503 and body["error"]["retryable"]
        assert metric(url, "gream_requests_total", endpoint="recommend", status="500") == 1
    finally:
        backend.loaded.set()
        server.should_exit = True
