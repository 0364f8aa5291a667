"""The HTTP API's requests and errors, without HTTP: a JSON body in, a validated request out, or
a ServeError that names the field and what was expected (the app turns it into the status and
the JSON error body).

POST /v1/recommend {"history": [item ids, oldest first], "top_k", "num_beams", "mode", "score",
"request_id", "timeout_ms"}: only `history` is required. POST /v1/recommend/batch
{"requests": [such objects]}."""
import json
import uuid
from dataclasses import dataclass

MODES = ("direct", "reasoning")
SCORES = ("full", "sid")
FIELDS = ("history", "top_k", "num_beams", "mode", "score", "request_id", "timeout_ms")


class ServeError(Exception):
    """A request the server answers with an error: HTTP `status`, a machine-readable `code`,
    the `field` at fault (None: the request as a whole) and whether retrying can succeed."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retryable: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.retryable, self.retry_after = retryable, retry_after

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "field": self.field,
                          "retryable": self.retryable}}


def bad(field: str | None, message: str, code: str = "invalid_request") -> ServeError:
    return ServeError(400, code, f"{field}: {message}" if field else message, field)


@dataclass(frozen=True)
class Limits:
    """What a request may ask (the server's configuration)."""
    num_items: int
    num_beams: int  # the default
    allowed_beams: tuple  # every beam count a request may ask (warm-up runs each)
    max_history: int  # the model's window: longer histories keep their last items
    max_history_items: int  # longer histories are refused (413)
    max_batch_requests: int
    timeout_ms: int  # the default deadline
    max_timeout_ms: int
    score: str = "full"


@dataclass
class RecommendRequest:
    history: list  # the items the model sees (the last max_history)
    dropped: int  # items cut from the front of the history
    top_k: int
    num_beams: int
    mode: str
    score: str
    request_id: str
    timeout_ms: int

    @property
    def key(self) -> tuple:
        """Requests with the same key can share a wave."""
        return self.mode, self.num_beams, self.score


def _short(name: str) -> str:
    """A client's field name as we echo it: at most 64 characters."""
    return name if len(name) <= 64 else name[:61] + "..."


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def decode_json(body: bytes):
    """The body as JSON: UTF-8 only (json.loads would also guess UTF-16 / 32), no NaN or
    Infinity literals, nesting as deep as the parser's recursion allows (deeper: 400, not a
    crash). Floats are never valid field values, so an overflowing 1e999 is refused later."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(None, f"the body is not UTF-8 (byte {e.start}): send UTF-8 JSON",
                  "invalid_json") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise bad(None, "the body's JSON is nested too deeply", "invalid_json") from None
    except ValueError as e:
        raise bad(None, f"the body is not valid JSON ({e})", "invalid_json") from None


def _int(obj, name, where, low, high=None):
    v = obj[name]
    if type(v) is not int:  # bool is an int subclass, 3.0 a float: both refused
        raise bad(where + name, f"expected an integer, got {json.dumps(v)[:40]}")
    if v < low or (high is not None and v > high):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise bad(where + name, f"expected {span}, got {v}")
    return v


def _choice(obj, name, where, choices):
    v = obj[name]
    if v not in choices or type(v) is not str:
        raise bad(where + name, f"expected one of {', '.join(map(json.dumps, choices))}, got "
                                f"{json.dumps(v)[:40]}")
    return v


def parse_request(obj, limits: Limits, where: str = "") -> RecommendRequest:
    """One recommendation request from its decoded JSON; `where` prefixes the field names
    (e.g. "requests[3].")."""
    if not isinstance(obj, dict):
        raise bad(where.rstrip(".") or None, "expected a JSON object")
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        raise bad(where + _short(unknown[0]), f"unknown field (expected {', '.join(FIELDS)})",
                  "unknown_field")
    if "history" not in obj:
        raise bad(where + "history", "required (the user's item ids, oldest first)")
    history = obj["history"]
    if not isinstance(history, list):
        raise bad(where + "history", "expected a list of item ids")
    if not history:
        raise bad(where + "history", "expected at least one item id")
    if len(history) > limits.max_history_items:
        raise ServeError(413, "history_too_long",
                         f"{where}history: {len(history)} items, at most "
                         f"{limits.max_history_items}", where + "history")
    for i, item in enumerate(history):
        if type(item) is not int:
            raise bad(f"{where}history[{i}]", f"expected an integer item id, got "
                                              f"{json.dumps(item)[:40]}")
        if not 0 <= item < limits.num_items:
            raise bad(f"{where}history[{i}]", f"item {item} is not in the index "
                                              f"(0..{limits.num_items - 1})", "unknown_item")
    beams = limits.num_beams
    if "num_beams" in obj:
        beams = obj["num_beams"]
        if type(beams) is not int or beams not in limits.allowed_beams:
            raise bad(where + "num_beams", f"expected one of {list(limits.allowed_beams)} "
                                           f"(the server's --allowed-beams), got "
                                           f"{json.dumps(beams)[:40]}")
    top_k = _int(obj, "top_k", where, 1, beams) if "top_k" in obj else beams
    mode = _choice(obj, "mode", where, MODES) if "mode" in obj else "direct"
    score = _choice(obj, "score", where, SCORES) if "score" in obj else limits.score
    request_id = obj.get("request_id", uuid.uuid4().hex)
    if type(request_id) is not str or not 0 < len(request_id) <= 128 \
            or not request_id.isprintable():
        raise bad(where + "request_id", "expected a printable string of 1..128 characters")
    timeout_ms = (_int(obj, "timeout_ms", where, 1, limits.max_timeout_ms)
                  if "timeout_ms" in obj else limits.timeout_ms)
    kept = history[-limits.max_history:]
    return RecommendRequest(kept, len(history) - len(kept), top_k, beams, mode, score,
                            request_id, timeout_ms)


def parse_batch(obj, limits: Limits) -> list:
    """The requests of a batch body {"requests": [...]}: all valid, or the first error."""
    if not isinstance(obj, dict):
        raise bad(None, "expected a JSON object {\"requests\": [...]}")
    unknown = [k for k in obj if k != "requests"]
    if unknown:
        raise bad(_short(unknown[0]), "unknown field (expected requests)", "unknown_field")
    reqs = obj.get("requests")
    if not isinstance(reqs, list) or not reqs:
        raise bad("requests", "expected a non-empty list of request objects")
    if len(reqs) > limits.max_batch_requests:
        raise ServeError(413, "batch_too_large", f"requests: {len(reqs)} requests, at most "
                                                 f"{limits.max_batch_requests}", "requests")
    out = [parse_request(r, limits, f"requests[{i}].") for i, r in enumerate(reqs)]
    ids = [r.request_id for r in out]
    if len(set(ids)) < len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise bad("requests", f"request_id {dup!r} appears more than once")
    return out
