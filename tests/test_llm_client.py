"""ChatClient against a fake OpenAI-compatible server on 127.0.0.1 (ephemeral port, offline)."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gream_fast.errors import FormatError, GreamError, InvalidInputError
from gream_fast.tasks.llm_client import ChatClient, TeacherError, _key


class FakeServer:
    """Answers with the last user message reversed. `script[text]` is a list of actions consumed
    one per attempt for requests whose last user message is `text`; `always[text]` is applied to
    every attempt. Actions: ("status", code, retry_after) | ("hang", seconds) | ("raw", bytes)."""

    def __init__(self, delay=0.0):
        self.delay = delay
        self.lock = threading.Lock()
        self.script, self.always = {}, {}
        self.seen = []          # last user message of every attempt, in arrival order
        self.succeeded = []     # ... of every attempt answered 200 with a proper body
        self.auth = []
        self.active = self.max_active = 0
        self.release = threading.Event()  # lets hanging handlers go at teardown

    def act(self, text):
        with self.lock:
            self.seen.append(text)
            if text in self.always:
                return self.always[text]
            steps = self.script.get(text)
            return steps.pop(0) if steps else None

    def handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
                with server.lock:
                    server.auth.append(self.headers.get("Authorization"))
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                time.sleep(server.delay)  # keeps requests overlapping so concurrency shows
                with server.lock:
                    # Before answering: once the answer is out, the client may start its next
                    # request before this thread runs again.
                    server.active -= 1
                try:
                    self.respond(server.act(text), text, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

            def respond(self, action, text, body):
                if action and action[0] == "hang":
                    server.release.wait(action[1])
                    return
                if action and action[0] == "status":
                    code, retry_after = action[1], action[2] if len(action) > 2 else None
                    payload = json.dumps({"error": {"message": f"scripted {code}"}}).encode()
                    self.send_response(code)
                    if retry_after is not None:
                        self.send_header("Retry-After", str(retry_after))
                elif action and action[0] == "raw":
                    payload = action[1]
                    self.send_response(200)
                else:
                    content = text[::-1] + f"|t={body['temperature']}"
                    message = {"role": "assistant", "content": content}
                    payload = json.dumps({"choices": [{"message": message}]}).encode()
                    self.send_response(200)
                    with server.lock:
                        server.succeeded.append(text)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # 127.0.0.1 must be reached directly
    fake = FakeServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield fake
    fake.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def client(server, **kw):
    kw = {"max_concurrency": 4, "max_retries": 3, "timeout": 5.0, "backoff_base": 0.001,
          "backoff_max": 0.01, **kw}
    return ChatClient(server.url, "teacher-model", **kw)


def msgs(text):
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


def expected(text, t=0.0):
    return text[::-1] + f"|t={t}"


def test_results_in_order_and_concurrency_bounded(server):
    server.delay = 0.05
    texts = [f"sample {i}" for i in range(16)]
    out = client(server, max_concurrency=4).complete_many([msgs(t) for t in texts], progress=False)
    assert out == [expected(t) for t in texts]
    assert 1 < server.max_active <= 4
    assert server.auth == [None] * 16


def test_auth_header_and_duplicates_sent_once(server):
    c = client(server, api_key="sk-test", temperature=0.5)
    out = c.complete_many([msgs("a"), msgs("b"), msgs("a")], progress=False)
    assert out == [expected("a", 0.5), expected("b", 0.5), expected("a", 0.5)]
    assert sorted(server.seen) == ["a", "b"]
    assert set(server.auth) == {"Bearer sk-test"}


def test_retries_then_succeeds(server):
    server.script = {
        "rate": [("status", 429, 1)],                   # Retry-After 1 s, capped by backoff_max
        "flaky": [("status", 500), ("status", 503), ("status", 502)],
    }
    t0 = time.monotonic()
    out = client(server).complete_many([msgs("rate"), msgs("flaky"), msgs("ok")], progress=False)
    assert out == [expected(t) for t in ("rate", "flaky", "ok")]
    assert server.seen.count("rate") == 2 and server.seen.count("flaky") == 4
    assert server.seen.count("ok") == 1
    assert time.monotonic() - t0 < 1.0  # the 1 s Retry-After was capped at backoff_max


def test_timeout_is_retried(server):
    server.script = {"slow": [("hang", 5.0)]}  # the first attempt outlasts the client's timeout
    out = client(server, timeout=0.5).complete_many([msgs("slow")], progress=False)
    assert out == [expected("slow")] and server.seen == ["slow", "slow"]


def test_delay_honours_retry_after_and_caps():
    c = ChatClient("http://127.0.0.1:1/v1", "m", backoff_base=1.0, backoff_max=10.0)
    assert c.delay(0, retry_after=3.0) == 3.0
    assert c.delay(0, retry_after=100.0) == 10.0
    assert 0.5 <= c.delay(0) <= 1.0 and 4.0 <= c.delay(3) <= 8.0 and c.delay(20) <= 10.0


def test_retries_exhausted_names_index_status_and_message(server):
    server.always = {"down": ("status", 503)}
    match = r"request 1: HTTP 503: scripted 503 \(after 3 attempts\)"
    with pytest.raises(TeacherError, match=match) as ei:
        client(server, max_retries=2).complete_many([msgs("x"), msgs("down")], progress=False)
    assert ei.value.index == 1 and ei.value.status == 503
    assert server.seen.count("down") == 3


def test_400_fails_fast(server):
    server.always = {"bad": ("status", 400)}
    texts = ["a", "b", "bad"]
    with pytest.raises(TeacherError, match=r"request 2: HTTP 400: scripted 400") as ei:
        client(server).complete_many([msgs(t) for t in texts], progress=False)
    assert isinstance(ei.value, GreamError) and ei.value.status == 400
    assert server.seen.count("bad") == 1


def test_connection_refused_is_retried_then_fails():
    c = ChatClient("http://127.0.0.1:9/v1", "m", max_retries=1, backoff_base=0.001,
                   backoff_max=0.01)
    with pytest.raises(TeacherError, match=r"request 0: no HTTP response: .*after 2 attempts"):
        c.complete_many([msgs("a")], progress=False)


@pytest.mark.parametrize("raw, missing", [
    (b"not json{", "not JSON"),
    (b'{"error": "oops"}', "missing choices"),
    (b'{"choices": []}', r"missing choices\[0\]"),
    (b'{"choices": [{"message": {"content": null}}]}', r"missing choices\[0\].message.content"),
])
def test_malformed_response(server, raw, missing):
    server.always = {"m": ("raw", raw)}
    with pytest.raises(TeacherError, match=rf"request 1: HTTP 200: malformed response: {missing}"):
        client(server).complete_many([msgs("fine"), msgs("m")], progress=False)
    assert server.seen.count("m") == 1


def test_cache_second_run_sends_nothing(server, tmp_path):
    cache = tmp_path / "sub" / "teacher.jsonl"
    reqs = [msgs(f"q{i}") for i in range(6)]
    first = client(server).complete_many(reqs, cache_path=cache, progress=True)
    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(lines) == 6
    assert {r["key"] for r in lines} == {_key(client(server).body(m)) for m in reqs}
    n = len(server.seen)
    assert client(server).complete_many(reqs, cache_path=cache, progress=False) == first
    assert len(server.seen) == n
    # other sampling parameters are other requests
    client(server, temperature=1.0).complete_many(reqs[:2], cache_path=cache, progress=False)
    assert len(server.seen) == n + 2


def test_interrupted_run_resumes(server, tmp_path):
    cache = tmp_path / "teacher.jsonl"
    texts = [f"q{i}" for i in range(30)]
    server.always = {"q5": ("status", 500)}  # fails for good
    server.delay = 0.02
    with pytest.raises(TeacherError, match="request 5: HTTP 500"):
        client(server, max_concurrency=2, max_retries=1).complete_many(
            [msgs(t) for t in texts], cache_path=cache, progress=False)
    cached = cache.read_text().splitlines()
    finished = set(server.succeeded)
    assert len(cached) == len(finished) and 0 < len(cached) < 29  # all flushed; queued ones skipped
    server.always.clear()
    server.seen.clear()
    out = client(server).complete_many([msgs(t) for t in texts], cache_path=cache, progress=False)
    assert out == [expected(t) for t in texts]
    assert sorted(server.seen) == sorted(set(texts) - finished)


def test_truncated_last_line_is_tolerated(server, tmp_path):
    cache = tmp_path / "teacher.jsonl"
    reqs = [msgs("a"), msgs("b"), msgs("c")]
    client(server).complete_many(reqs[:2], cache_path=cache, progress=False)
    with open(cache, "ab") as f:
        f.write(b'{"key": "abc", "cont')  # a write cut short by a crash
    server.seen.clear()
    out = client(server).complete_many(reqs, cache_path=cache, progress=False)
    assert out == [expected("a"), expected("b"), expected("c")] and server.seen == ["c"]
    lines = cache.read_text().splitlines()  # the partial line was replaced, not appended to
    assert len(lines) == 3 and all(json.loads(line) for line in lines)


def test_corrupt_middle_line_raises(server, tmp_path):
    cache = tmp_path / "teacher.jsonl"
    good = json.dumps({"key": "k", "content": "c"})
    cache.write_text(f"{good}\nnot json\n{good}\n")
    with pytest.raises(FormatError, match=r"teacher.jsonl, line 2: expected a JSON object"):
        client(server).complete_many([msgs("a")], cache_path=cache, progress=False)
    assert server.seen == []


def test_from_env(monkeypatch):
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "GREAM_TEACHER_MODEL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(InvalidInputError, match="OPENAI_BASE_URL"):
        ChatClient.from_env()
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1/")
    with pytest.raises(InvalidInputError, match="GREAM_TEACHER_MODEL"):
        ChatClient.from_env()
    monkeypatch.setenv("GREAM_TEACHER_MODEL", "qwen")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-1")
    c = ChatClient.from_env(max_concurrency=2)
    assert (c.base_url, c.model, c.api_key, c.max_concurrency) == (
        "http://127.0.0.1:8000/v1", "qwen", "sk-1", 2)
    assert ChatClient.from_env(model="other").model == "other"


def test_bad_arguments():
    with pytest.raises(InvalidInputError, match="max_concurrency"):
        ChatClient("http://x/v1", "m", max_concurrency=0)
    with pytest.raises(InvalidInputError, match="extra_body"):
        ChatClient("http://x/v1", "m", extra_body={"model": "y"})
    with pytest.raises(InvalidInputError, match=r"requests\[1\]"):
        ChatClient("http://x/v1", "m").complete_many([msgs("a"), "oops"], progress=False)


def test_openai_teacher_profiles_through_the_cli(server, tmp_path, monkeypatch):
    """`gream-fast tasks profile --teacher openai` end to end against the local server; a second
    run is served from the cache beside the dataset."""
    from gream_fast.cli import main
    from gream_fast.data.prepare import prepare, write
    from gream_fast.data.synth import SynthConfig, synthesize

    data = tmp_path / "data"
    write(prepare(synthesize(SynthConfig(users=40, items=30, seed=3))), data)
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("GREAM_TEACHER_MODEL", "teacher-model")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    assert main(["tasks", "profile", "--data", str(data), "--teacher", "openai"]) == 0
    profiles = [json.loads(l) for l in (data / "profiles.jsonl").read_text().splitlines()]
    assert profiles and all(p["preference"].endswith("|t=0.0") for p in profiles)
    sent = len(server.succeeded)
    assert 0 < sent <= 2 * len(profiles)  # a preference and an intent per user, repeats sent once
    assert main(["tasks", "profile", "--data", str(data), "--teacher", "openai"]) == 0
    assert len(server.succeeded) == sent  # all from the cache
