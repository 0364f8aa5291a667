"""The HTTP side: an ASGI app (Starlette) over the engine, and `serve()`, which runs it with
uvicorn until SIGTERM / SIGINT and then drains.

Endpoints: POST /v1/recommend, POST /v1/recommend/batch, GET /health (liveness), GET /ready
(503 with reasons while loading, warming up, draining or full), GET /v1/info, GET /metrics.
Every error is JSON {"error": {"code", "message", "field", "retryable"}} with its status."""
import asyncio
import gc
import json
import platform
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict

from gream_fast.serve.engine import Engine
from gream_fast.serve.protocol import ServeError, decode_json, parse_batch, parse_request


ENDPOINTS = {"/v1/recommend": "recommend", "/v1/recommend/batch": "recommend_batch",
             "/health": "health", "/ready": "ready", "/v1/info": "info", "/metrics": "metrics"}


def _json(body, status: int = 200, headers=None):
    from starlette.responses import Response

    # allow_nan=False: a non-finite score is a bug to report (500), never invalid JSON
    return Response(json.dumps(body, separators=(",", ":"), allow_nan=False), status, headers,
                    media_type="application/json")


def error_response(e: ServeError):
    headers = {"Retry-After": str(max(1, round(e.retry_after)))} if e.retry_after else None
    return _json(e.body(), e.status, headers)


async def read_body(request, limit: int) -> bytes:
    """The body, refused with 413 once it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ServeError(400, "invalid_request", "Content-Length: expected a byte count")
        if int(declared) > limit:
            raise ServeError(413, "body_too_large", f"the body has {declared} bytes, at most "
                                                    f"{limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, "body_too_large", f"the body passed {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def wait_for(job) -> object:
    """The job's Answer (or its ServeError), or a 504 once its deadline passes (the job is
    then cancelled: it leaves the queue, or its answer is dropped if it is running)."""
    fut = asyncio.wrap_future(job.future)
    try:
        return await asyncio.wait_for(asyncio.shield(fut), max(job.deadline - time.monotonic(), 0))
    except asyncio.TimeoutError:
        job.cancel()
        raise ServeError(504, "deadline_exceeded", f"no answer within timeout_ms "
                                                   f"({job.request.timeout_ms})",
                         retryable=True) from None


class CountRequests:
    """ASGI middleware: every HTTP request counted by endpoint and status and timed, whatever
    answered it (our handlers, Starlette's 404 / 405, the 500 handler, a cancelled task)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.monotonic(), [499]  # 499 unless a response starts

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sending)
        except Exception:  # the 500 handler outside answers it
            if status[0] == 499:
                status[0] = 500
            raise
        finally:
            endpoint = ENDPOINTS.get(scope["path"], "other")
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.monotonic() - t0)


def versions() -> dict:
    import torch
    import transformers

    import gream_fast

    return {"gream_fast": gream_fast.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def build_app(engine: Engine, backend, limits, metrics, max_body_bytes: int,
              config: dict | None = None, lifespan=None):
    """The ASGI app. `limits`: protocol.Limits; `config`: what /v1/info reports."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response
    from starlette.routing import Route

    def answer_json(req, ans, t0):
        items, seen, invalid = [], set(), 0
        for item, score in zip(ans.items, ans.scores):
            real = 0 <= item < limits.num_items and item not in seen
            invalid += not real
            seen.add(item)
            entry = {"item": item, "score": score, "sid": backend.sids[item] if real else None}
            if backend.titles is not None:
                entry["title"] = backend.titles[item] if real else None
            items.append(entry)
        metrics.items_returned.inc(len(items))
        if invalid:
            metrics.invalid_items.inc(invalid)
        return {"request_id": req.request_id, "items": items, "mode": req.mode,
                "num_beams": req.num_beams, "score": req.score,
                "history_used": len(req.history), "history_dropped": req.dropped,
                "timing": {"queue_ms": round(ans.queue_s * 1e3, 3),
                           "compute_ms": round(ans.compute_s * 1e3, 3),
                           "total_ms": round((time.monotonic() - t0) * 1e3, 3),
                           "batch_size": ans.batch_size, "batch_rows": ans.batch_rows},
                "index": {"fingerprint": backend.fingerprint, "num_items": limits.num_items}}

    def answering(handler):
        """A handler's ServeErrors become their JSON answers."""
        async def run(request):
            t0 = time.monotonic()
            try:
                return await handler(request, t0)
            except ServeError as e:
                return error_response(e)
            except ClientDisconnect:  # nobody to answer
                return Response(status_code=499)
        return run

    async def answers(reqs) -> list:
        """Each request's Answer or ServeError, the requests queued together (all refused
        together: the ServeError raised), each outcome counted once."""
        try:
            jobs = engine.submit_all(reqs)
            results = await asyncio.gather(*(wait_for(j) for j in jobs), return_exceptions=True)
        except ServeError as e:
            metrics.recommendations.labels(str(e.status)).inc(len(reqs))
            raise
        for res in results:
            if isinstance(res, BaseException) and not isinstance(res, ServeError):
                raise res
            status = res.status if isinstance(res, ServeError) else 200
            metrics.recommendations.labels(str(status)).inc()
        return results

    @answering
    async def recommend(request, t0):
        req = parse_request(decode_json(await read_body(request, max_body_bytes)), limits)
        res, = await answers([req])
        if isinstance(res, ServeError):
            raise res
        return _json(answer_json(req, res, t0))

    @answering
    async def recommend_batch(request, t0):
        reqs = parse_batch(decode_json(await read_body(request, max_body_bytes)), limits)
        return _json({"responses": [
            {"request_id": req.request_id, **res.body()} if isinstance(res, ServeError)
            else answer_json(req, res, t0) for req, res in zip(reqs, await answers(reqs))]})

    @answering
    async def health(request, t0):
        ok = engine.state != "failed"
        return _json({"status": "ok" if ok else "failed", "state": engine.state},
                     200 if ok else 503)

    @answering
    async def ready(request, t0):
        reasons = engine.not_ready()
        return _json({"ready": not reasons, "reasons": reasons}, 503 if reasons else 200)

    @answering
    async def info(request, t0):
        return _json({"state": engine.state, "config": config or {}, "versions": versions(),
                      "device": backend.device,
                      "index": {"fingerprint": getattr(backend, "fingerprint", None),
                                "num_items": limits.num_items},
                      "limits": asdict(limits) | {"allowed_beams": list(limits.allowed_beams)},
                      "engine": asdict(engine.limits),
                      "kv_pool": getattr(backend, "kv_pool", None)})

    async def prometheus(request):
        return Response(metrics.render(), media_type=metrics.content_type)

    async def http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _json(ServeError(exc.status_code, code, f"{request.method} {request.url.path}: "
                                f"{exc.detail}").body(), exc.status_code, exc.headers)

    async def internal_error(request, exc):
        return _json(ServeError(500, "internal", f"{type(exc).__name__}: {exc}").body(), 500)

    routes = [Route("/v1/recommend", recommend, methods=["POST"]),
              Route("/v1/recommend/batch", recommend_batch, methods=["POST"]),
              Route("/health", health, methods=["GET"]),
              Route("/ready", ready, methods=["GET"]),
              Route("/v1/info", info, methods=["GET"]),
              Route("/metrics", prometheus, methods=["GET"])]
    from starlette.middleware import Middleware

    return Starlette(routes=routes, lifespan=lifespan,
                     middleware=[Middleware(CountRequests, metrics=metrics)],
                     exception_handlers={HTTPException: http_error, Exception: internal_error})


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), bound before the model loads so that the
    URL is known and /health answers while loading."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def make_server(engine: Engine, app, grace_s: float, log=print):
    """A uvicorn server for `app` whose SIGTERM / SIGINT drain first: stop accepting, let the
    requests in flight finish (grace_s at most), then drain the engine (the lifespan's end).
    It stops by itself if the engine fails to load."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:
                log(f"gream-fast serve: draining (signal {sig}; up to {grace_s:g} s)")
                # the engine finishes (or, past the grace, answers 503) what it accepted while
                # the handlers still wait: their answers go out before uvicorn closes them
                threading.Thread(target=engine.stop, args=(grace_s,), daemon=True).start()
            engine.drain()
            super().handle_exit(sig, frame)
            # a drained SIGTERM is a clean exit: uvicorn would re-raise it after the shutdown
            self._captured_signals = [s for s in self._captured_signals
                                      if s != signal.SIGTERM]

    # uvicorn's own grace comes after the engine's: by then every handler has its answer
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=grace_s + 5)
    server = Server(config)

    def failed(exc):
        server.should_exit = True

    engine.on_fail = failed
    return server


def run_server(engine: Engine, app, sock: socket.socket, grace_s: float, log=print) -> None:
    """Serve `app` on `sock` until a signal (make_server); raises the engine's load error if
    it failed to start."""
    make_server(engine, app, grace_s, log).run(sockets=[sock])
    if engine.error is not None:
        raise engine.error


def serving_lifespan(engine: Engine, grace_s: float, url: str, log=print):
    """Starlette lifespan: the engine starts with the server (loading, warm-up, then ready:
    gc.freeze() so that the collector never walks the model's objects again) and drains when
    it stops."""
    import contextlib

    def on_ready():
        gc.collect()
        gc.freeze()
        log(f"gream-fast serve: ready at {url}")
        sys.stdout.flush()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.on_ready = on_ready
        engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop, grace_s)

    return lifespan
