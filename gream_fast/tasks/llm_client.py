"""A small client for any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp,
OpenAI itself): the teacher that writes reasoning chains and user profiles for many samples.

Standard library only. `ChatClient.complete_many` sends a batch with bounded concurrency, retries
transient failures, and keeps a resumable JSONL cache so an interrupted run loses at most the
requests that were in flight.
"""
from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from gream_fast.errors import FormatError, GreamError, InvalidInputError

# Keys a caller may not override through extra_body: they define the request (or, for "stream",
# would change the response format this client parses).
_RESERVED = ("model", "messages", "stream")


class TeacherError(GreamError):
    """A teacher request failed for good (after retries, or at once for a non-retryable status or
    a malformed response). `index` is the position in the batch; `status` the HTTP status, or None
    when no HTTP response came back."""

    def __init__(self, index: int, status: int | None, message: str):
        self.index, self.status, self.message = index, status, message
        where = f"HTTP {status}" if status is not None else "no HTTP response"
        super().__init__(f"teacher request {index}: {where}: {message}")


class ChatClient:
    """Client for POST {base_url}/chat/completions.

    base_url: e.g. "http://127.0.0.1:8000/v1". api_key, when given, is sent as a Bearer token.
    temperature / max_tokens / extra_body (e.g. {"top_p": 0.9}) go into every request body and
    into the cache key (max_tokens=None leaves it out). Retries: up to `max_retries` more attempts
    on connection errors, timeouts, HTTP 429 and 5xx, sleeping an exponentially growing, jittered
    delay (backoff_base * 2**attempt, at most backoff_max) or the server's Retry-After (also capped
    at backoff_max). Other statuses fail at once.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *,
                 max_concurrency: int = 8, max_retries: int = 5, timeout: float = 60.0,
                 temperature: float = 0.0, max_tokens: int | None = 1024,
                 extra_body: dict | None = None, backoff_base: float = 1.0,
                 backoff_max: float = 60.0):
        if not base_url or not isinstance(base_url, str):
            raise InvalidInputError(
                f"base_url: expected a URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
        if not model or not isinstance(model, str):
            raise InvalidInputError(f"model: expected a model name, got {model!r}")
        for name, value, low in (("max_concurrency", max_concurrency, 1),
                                 ("max_retries", max_retries, 0)):
            if not isinstance(value, int) or value < low:
                raise InvalidInputError(f"{name}: expected an int >= {low}, got {value!r}")
        for name, value in (("timeout", timeout), ("backoff_base", backoff_base),
                            ("backoff_max", backoff_max)):
            if not value >= 0 or (name == "timeout" and value == 0):
                raise InvalidInputError(f"{name}: expected a positive number of seconds, "
                                        f"got {value!r}")
        extra_body = dict(extra_body or {})
        if bad := [k for k in _RESERVED if k in extra_body]:
            raise InvalidInputError(f"extra_body: may not set {bad}; the client sets them")
        self.base_url, self.model, self.api_key = base_url.rstrip("/"), model, api_key
        self.max_concurrency, self.max_retries = max_concurrency, max_retries
        self.timeout = float(timeout)
        # float() so that temperature=0 and 0.0 give the same cache key
        self.temperature, self.max_tokens = float(temperature), max_tokens
        self.extra_body = extra_body
        self.backoff_base, self.backoff_max = float(backoff_base), float(backoff_max)
        self._url = self.base_url + "/chat/completions"
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._rng = random.Random()  # jitter only: it never affects results

    @classmethod
    def from_env(cls, **overrides) -> "ChatClient":
        """Build a client from the environment; keyword arguments override it.

        OPENAI_BASE_URL     the server, e.g. http://127.0.0.1:8000/v1   (required)
        GREAM_TEACHER_MODEL the model name the server serves            (required)
        OPENAI_API_KEY      sent as a Bearer token                      (optional)
        """
        for arg, var in (("base_url", "OPENAI_BASE_URL"), ("model", "GREAM_TEACHER_MODEL"),
                         ("api_key", "OPENAI_API_KEY")):
            if overrides.get(arg) is None:
                overrides[arg] = os.environ.get(var) or None
                if overrides[arg] is None and arg != "api_key":
                    raise InvalidInputError(
                        f"environment variable {var} is not set (the teacher's {arg})")
        return cls(**overrides)

    def body(self, messages: list[dict]) -> dict:
        """The JSON body sent for one request."""
        body = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return {**body, **self.extra_body}

    def complete_many(self, requests: list[list[dict]], cache_path=None,
                      progress: bool = True) -> list[str]:
        """Send each message list and return the assistant contents, in the order of `requests`.

        Runs up to max_concurrency requests at once; identical requests are sent once. With
        `cache_path`, finished results are appended to that JSONL file as they arrive
        ({"key": sha256 of the body, "content": ...}) and requests already there are not sent
        again, so a rerun resumes an interrupted one. On a final failure no new requests start;
        the ones in flight finish and are cached, then the first failure is raised (TeacherError).
        """
        bodies = []
        for i, messages in enumerate(requests):
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise InvalidInputError(f"requests[{i}]: expected a list of {{'role', 'content'}} "
                                        f"dicts, got {type(messages).__name__}")
            bodies.append(self.body(messages))
        keys = [_key(b) for b in bodies]
        first = {}  # key -> index of its first request: duplicates are sent once
        for i, key in enumerate(keys):
            first.setdefault(key, i)

        done, intact, ends_newline = {}, 0, True
        if cache_path is not None:
            cache_path = Path(cache_path)
            done, intact, ends_newline = _read_cache(cache_path, set(first))
        todo = [i for key, i in first.items() if key not in done]
        if todo:
            cache = None
            if cache_path is not None:
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                cache = open(cache_path, "ab")
                if cache.tell() > intact:
                    cache.truncate(intact)  # drop the partial last line of an interrupted run
                if not ends_newline:
                    cache.write(b"\n")
            try:
                self._run(todo, bodies, keys, done, cache, progress, len(first))
            finally:
                if cache is not None:
                    cache.close()
        return [done[key] for key in keys]

    def _run(self, todo, bodies, keys, done, cache, progress, total):
        from tqdm import tqdm

        stop = threading.Event()  # set on the first final failure: queued requests are skipped
        pool = ThreadPoolExecutor(min(self.max_concurrency, len(todo)),
                                  thread_name_prefix="teacher")
        bar = tqdm(total=total, initial=total - len(todo), disable=not progress, desc="teacher",
                   unit="req")
        error = None
        try:
            futures = {pool.submit(self._task, i, json.dumps(bodies[i]).encode(), stop): i
                       for i in todo}
            for fut in as_completed(futures):
                try:
                    content = fut.result()
                except Exception as e:
                    if error is None:
                        error = e
                        stop.set()
                    continue
                if content is None:  # skipped after an earlier failure
                    continue
                key = keys[futures[fut]]
                done[key] = content
                if cache is not None:
                    # Only this thread writes, so lines never interleave; flush so a crash
                    # keeps every finished line.
                    line = json.dumps({"key": key, "content": content}, ensure_ascii=False)
                    cache.write(line.encode() + b"\n")
                    cache.flush()
                bar.update(1)
        except BaseException:  # e.g. KeyboardInterrupt: stop without waiting for in-flight requests
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            bar.close()
        pool.shutdown()
        if error is not None:
            raise error

    def _task(self, index: int, body: bytes, stop: threading.Event) -> str | None:
        if stop.is_set():
            return None
        return self._send(index, body, stop)

    def _send(self, index: int, body: bytes, stop: threading.Event) -> str:
        """POST one request, retrying transient failures; returns the assistant content."""
        for attempt in range(self.max_retries + 1):
            status, retry_after = None, None
            try:
                req = urllib.request.Request(self._url, data=body, headers=self._headers,
                                             method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                return _content(raw, index, resp.status)
            except urllib.error.HTTPError as e:
                status, message = e.code, _error_message(e)
                retry_after = _retry_after(e.headers.get("Retry-After") if e.headers else None)
                if status != 429 and status < 500:
                    raise TeacherError(index, status, message) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                # connection refused/reset, timeouts (socket.timeout is an OSError), bad status line
                message = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
            # stop.wait returns True when another request failed for good: give up now too
            if attempt == self.max_retries or stop.wait(self.delay(attempt, retry_after)):
                break
        raise TeacherError(index, status, f"{message} (after {attempt + 1} attempts)")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to sleep before retry number attempt + 1."""
        if retry_after is not None:
            return min(self.backoff_max, max(0.0, retry_after))
        # Half jitter: the delay still grows, but workers that failed together retry apart.
        window = min(self.backoff_max, self.backoff_base * 2 ** attempt)
        return window / 2 + self._rng.uniform(0, window / 2)


def _key(body: dict) -> str:
    """sha256 of the body's canonical JSON: model, messages and sampling parameters."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _content(raw: bytes, index: int, status: int) -> str:
    """choices[0].message.content of a response body, or a TeacherError naming what is missing."""
    try:
        node = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise TeacherError(index, status, f"malformed response: not JSON: {raw[:200]!r}") from None
    seen = ""
    for part in ("choices", 0, "message", "content"):
        seen += f"[{part}]" if isinstance(part, int) else (f".{part}" if seen else part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
        if node is None:
            raise TeacherError(index, status, f"malformed response: missing {seen}: {raw[:200]!r}")
    if not isinstance(node, str):
        raise TeacherError(index, status,
                           f"malformed response: {seen} is {type(node).__name__}, not a string")
    return node


def _error_message(e: urllib.error.HTTPError) -> str:
    """The server's error message: OpenAI's {"error": {"message": ...}} or the raw body."""
    try:
        raw = e.read()
    except (OSError, http.client.HTTPException):
        return str(e.reason)
    try:
        err = json.loads(raw)["error"]
        return str(err["message"] if isinstance(err, dict) else err)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return raw.decode("utf-8", "replace")[:500] or str(e.reason)


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (it is a number of seconds or an HTTP date); None when absent or
    unreadable."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError):
        return None


def _read_cache(path: Path, wanted: set) -> tuple[dict, int, bool]:
    """Read a cache file: the contents of the `wanted` keys, the byte length of its intact part, and
    whether that part ends with a newline. An unreadable last line is an interrupted write and is
    left out of the intact part; an unreadable line with lines after it is a FormatError."""
    found, intact, ends_newline, bad = {}, 0, True, None
    if not path.exists():
        return found, intact, ends_newline
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if bad is not None:
                raise FormatError(bad)
            if raw.strip():
                try:
                    record = json.loads(raw)
                    key, content = record["key"], record["content"]
                    if not isinstance(key, str) or not isinstance(content, str):
                        raise TypeError("'key' and 'content' must be strings")
                except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                    bad = (f"{path}, line {lineno}: expected a JSON object with string 'key' and "
                           f"'content' ({type(e).__name__}: {e})")
                    continue
                if key in wanted:
                    found.setdefault(key, content)
            intact += len(raw)
            ends_newline = raw.endswith(b"\n")
    return found, intact, ends_newline
