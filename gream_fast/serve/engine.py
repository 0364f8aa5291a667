"""The serving engine, with no HTTP in it: one thread owns the model, the decode runner and the
SID constraints; requests wait in a queue with their deadlines and run in waves.

A wave: the oldest waiting request, then every other one with the same (mode, num_beams,
score), oldest first, up to max_batch_size prompts and max_batch_rows beam rows, gathered
until the wave is full or the oldest has waited max_wait_ms. One beam search runs the wave
(gream_fast.generate.recommend, or reason_and_recommend in reasoning mode); each request gets
its top_k. A request whose deadline passed before its wave started is answered 504 without
being computed; one its caller gave up on (cancel()) is dropped.
"""
import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from gream_fast.serve.protocol import RecommendRequest, ServeError

STATES = ("loading", "warming_up", "ready", "draining", "stopped", "failed")


@dataclass
class Job:
    request: RecommendRequest
    arrival: float  # time.monotonic()
    deadline: float
    future: Future = field(default_factory=Future)
    cancelled: bool = False

    def cancel(self) -> None:
        """The caller stopped waiting: leave the queue at the next wave."""
        self.cancelled = True


@dataclass
class Answer:
    """A request's result: its items best first and how it was computed."""
    items: list
    scores: list
    queue_s: float
    compute_s: float
    batch_size: int  # prompts in the wave
    batch_rows: int  # beam rows in the wave


@dataclass
class EngineLimits:
    max_batch_size: int = 32
    max_batch_rows: int = 1024
    max_wait_ms: float = 2.0
    max_queue: int = 256


class Engine:
    """Runs `backend` (load(), warmup(), run(histories, mode, num_beams, score) -> items,
    scores arrays [B, num_beams]) on its own thread. submit() from any thread."""

    def __init__(self, backend, limits: EngineLimits, metrics, on_ready=None, on_fail=None):
        self.backend, self.limits, self.metrics = backend, limits, metrics
        self.on_ready, self.on_fail = on_ready, on_fail
        self.state = "loading"
        self.error: BaseException | None = None
        self._pending = collections.deque()
        self._cond = threading.Condition()
        self._running = 0
        self._thread = threading.Thread(target=self._main, name="gream-engine", daemon=True)

    # -- the callers' side ---------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def not_ready(self) -> list:
        """Why the engine cannot take a request now ([] when it can)."""
        reasons = [] if self.state == "ready" else [self.state]
        if len(self._pending) >= self.limits.max_queue:
            reasons.append("queue_full")
        return reasons

    def submit(self, request: RecommendRequest) -> Job:
        """Queue one request; raises ServeError 503 (not ready, draining) or 429 (queue full)."""
        now = time.monotonic()
        job = Job(request, now, now + request.timeout_ms / 1e3)
        with self._cond:
            self._admit(1)
            self._pending.append(job)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify()
        return job

    def submit_all(self, requests) -> list:
        """Queue a batch's requests together: all of them, or none (429 / 503)."""
        now = time.monotonic()
        jobs = [Job(r, now, now + r.timeout_ms / 1e3) for r in requests]
        with self._cond:
            self._admit(len(jobs))
            self._pending.extend(jobs)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify()
        return jobs

    def _admit(self, n: int) -> None:
        if self.state != "ready":
            raise ServeError(503, "not_ready", f"the server is {self.state.replace('_', ' ')}",
                             retryable=self.state in ("loading", "warming_up"), retry_after=1)
        if len(self._pending) + n > self.limits.max_queue:
            raise ServeError(429, "overloaded",
                             f"the queue is full ({len(self._pending)} of "
                             f"{self.limits.max_queue} waiting): retry later",
                             retryable=True, retry_after=max(self.limits.max_wait_ms / 1e3, 0.05))

    def drain(self) -> None:
        """Stop taking requests; the queued and running ones still complete."""
        with self._cond:
            if self.state in ("ready", "loading", "warming_up"):
                self.state = "draining"
            self._cond.notify_all()

    def stop(self, timeout: float | None = None) -> bool:
        """Drain, wait up to `timeout` s for the queue to empty, then end the thread; True when
        every accepted request was answered."""
        self.drain()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending or self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            done = not self._pending and not self._running
            if self.state != "failed":
                self.state = "stopped"
            for job in self._pending:  # past the grace period: answered, not lost
                job.future.set_exception(ServeError(503, "shutting_down", "the server shut "
                                                    "down before this request ran", retryable=True))
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout=5)
        return done

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    # -- the engine thread -----------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.backend.load()
            self.state = "warming_up"
            self.backend.warmup()
            self._graphs()
        except BaseException as e:  # noqa: BLE001: reported to the server, which exits
            self.error, self.state = e, "failed"
            if self.on_fail:
                self.on_fail(e)
            return
        with self._cond:
            if self.state == "warming_up":
                self.state = "ready"
        if self.on_ready:
            self.on_ready()
        while True:
            wave = self._next_wave()
            if wave is None:
                return
            self._run(wave)

    def _next_wave(self):
        lim = self.limits
        with self._cond:
            while not self._pending:
                if self.state in ("draining", "stopped"):
                    self._cond.notify_all()
                    if self.state == "stopped":
                        return None
                self._cond.wait(0.5 if self.state == "draining" else None)
            oldest = self._pending[0]
            while True:
                wave = self._gather(oldest.request.key)
                if not wave:  # the oldest left (expired or cancelled): start over
                    return []
                full = (len(wave) >= lim.max_batch_size or
                        (len(wave) + 1) * wave[0].request.num_beams > lim.max_batch_rows)
                left = oldest.arrival + lim.max_wait_ms / 1e3 - time.monotonic()
                if full or left <= 0 or self.state != "ready":
                    break
                self._cond.wait(left)
            for job in wave:
                self._pending.remove(job)
            self._running = len(wave)
            self.metrics.queue_depth.set(len(self._pending))
            self.metrics.running.set(len(wave))
            return wave

    def _gather(self, key) -> list:
        """The wave for `key` from the queue, oldest first (called under the lock); expired
        and cancelled jobs leave the queue here."""
        lim, now, wave = self.limits, time.monotonic(), []
        for job in list(self._pending):
            if job.cancelled or job.deadline <= now:
                self._pending.remove(job)
                if not job.cancelled:
                    job.future.set_exception(ServeError(
                        504, "deadline_exceeded", f"the request waited past its timeout_ms "
                        f"({job.request.timeout_ms}) before it could run", retryable=True))
                continue
            if job.request.key != key:
                continue
            if wave and (len(wave) >= lim.max_batch_size or
                         (len(wave) + 1) * job.request.num_beams > lim.max_batch_rows):
                break
            wave.append(job)
        return wave

    def _run(self, wave: list) -> None:
        if not wave:
            return
        r0, start = wave[0].request, time.monotonic()
        try:
            items, scores = self.backend.run([j.request.history for j in wave], r0.mode,
                                             r0.num_beams, r0.score)
            error = None
        except Exception as e:  # noqa: BLE001: the wave's requests get a 500, the engine lives
            error = e
        compute = time.monotonic() - start
        m = self.metrics
        m.batch_compute_seconds.observe(compute)
        m.batch_size.observe(len(wave))
        m.batch_rows.observe(len(wave) * r0.num_beams)
        self._graphs()
        for i, job in enumerate(wave):
            m.queue_wait_seconds.observe(start - job.arrival)
            if error is not None:
                job.future.set_exception(ServeError(500, "internal", f"the wave failed: "
                                                    f"{type(error).__name__}: {error}"))
                continue
            k = job.request.top_k
            job.future.set_result(Answer(np.asarray(items[i][:k]).tolist(),
                                         np.asarray(scores[i][:k], dtype=float).tolist(),
                                         start - job.arrival, compute, len(wave),
                                         len(wave) * r0.num_beams))
        with self._cond:
            self._running = 0
            self.metrics.running.set(0)
            self._cond.notify_all()

    def _graphs(self) -> None:
        self.metrics.graph_captures.set(getattr(self.backend, "graph_captures", 0))
