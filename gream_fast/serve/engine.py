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


@dataclass
class Job:
    request: RecommendRequest
    arrival: float  # time.monotonic()
    deadline: float
    future: Future = field(default_factory=Future)

    def cancel(self) -> None:
        """The caller stopped waiting: the job leaves the queue (a wave already running
        computes it and the answer is dropped)."""
        self.future.cancel()

    @property
    def dead(self) -> bool:
        return self.future.cancelled() or self.deadline <= time.monotonic()


def _settle(job: Job, result=None, error: BaseException | None = None) -> None:
    """Answer a job once; one its caller cancelled meanwhile stays cancelled."""
    if job.future.done():
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(result)


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
        metrics.queue_depth.set_function(lambda: len(self._pending))
        metrics.running.set_function(lambda: self._running)
        metrics.graph_captures.set_function(lambda: getattr(self.backend, "graph_captures", 0))
        metrics.eager_steps.set_function(lambda: getattr(self.backend, "eager_steps", 0))

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
        return self.submit_all([request])[0]

    def submit_all(self, requests) -> list:
        """Queue requests together: all of them, or none (ServeError 429 / 503)."""
        now = time.monotonic()
        jobs = [Job(r, now, now + r.timeout_ms / 1e3) for r in requests]
        with self._cond:
            self._admit(len(jobs))
            self._pending.extend(jobs)
            self._cond.notify()
        return jobs

    def _admit(self, n: int) -> None:
        """Room for n more jobs (called under the lock), or the ServeError that says why not:
        503 until ready and after (retryable: another replica, or this one soon), 429 when
        the queue is full once the jobs nobody waits for are gone."""
        if self.state != "ready":
            raise ServeError(503, "not_ready", f"the server is {self.state.replace('_', ' ')}",
                             retryable=True, retry_after=1)
        if len(self._pending) + n > self.limits.max_queue:
            self._drop_dead()
        if len(self._pending) + n > self.limits.max_queue:
            raise ServeError(429, "overloaded",
                             f"the queue is full ({len(self._pending)} of "
                             f"{self.limits.max_queue} waiting): retry later",
                             retryable=True, retry_after=max(self.limits.max_wait_ms / 1e3, 0.05))

    def _drop_dead(self) -> None:
        """Jobs whose caller gave up or whose deadline passed leave the queue (under the lock);
        the expired ones are answered 504."""
        for job in [j for j in self._pending if j.dead]:
            self._pending.remove(job)
            _settle(job, error=ServeError(
                504, "deadline_exceeded", f"the request waited past its timeout_ms "
                f"({job.request.timeout_ms}) before it could run", retryable=True))

    def _fits(self, wave: list, job: Job) -> bool:
        """Whether `job` can join `wave` within the batch limits."""
        lim = self.limits
        return not wave or (len(wave) < lim.max_batch_size and
                            (len(wave) + 1) * job.request.num_beams <= lim.max_batch_rows)

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
                _settle(job, error=ServeError(503, "shutting_down", "the server shut down "
                                                   "before this request ran", retryable=True))
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
            with self._cond:  # a drain or stop meanwhile wins
                if self.state == "loading":
                    self.state = "warming_up"
            if self.state == "warming_up":
                self.backend.warmup()
            with self._cond:
                ready = self.state == "warming_up"
                if ready:
                    self.state = "ready"
            if ready and self.on_ready:
                self.on_ready()
            while (wave := self._next_wave()) is not None:
                self._run(wave)
        except BaseException as e:  # noqa: BLE001: reported to the server, which exits
            with self._cond:
                self.error, self.state = e, "failed"
                for job in self._pending:
                    _settle(job, error=ServeError(503, "engine_failed", f"the engine stopped: "
                                                       f"{type(e).__name__}: {e}", retryable=True))
                self._pending.clear()
                self._running = 0
                self._cond.notify_all()
            if self.on_fail:
                self.on_fail(e)

    def _next_wave(self):
        """The next wave, [] when the oldest job left, None when the engine stops."""
        with self._cond:
            while not self._pending:
                if self.state == "stopped":
                    return None
                self._cond.notify_all()  # stop() may be waiting for an empty queue
                self._cond.wait(0.5)
            oldest = self._pending[0]
            while True:
                wave = self._gather(oldest.request.key)
                if not wave or wave[0] is not oldest:  # the oldest left: start over
                    return []
                full = not self._fits(wave, oldest)  # no room for one more of this key
                left = oldest.arrival + self.limits.max_wait_ms / 1e3 - time.monotonic()
                if full or left <= 0 or self.state != "ready":
                    break
                self._cond.wait(left)
            for job in wave:
                self._pending.remove(job)
            # from here a job is running: its caller can no longer cancel it
            wave = [j for j in wave if j.future.set_running_or_notify_cancel()]
            self._running = len(wave)
            return wave

    def _gather(self, key) -> list:
        """The wave for `key` from the queue, oldest first (under the lock), after the jobs
        nobody waits for left."""
        self._drop_dead()
        wave = []
        for job in self._pending:
            if job.request.key != key:
                continue
            if not self._fits(wave, job):
                break
            wave.append(job)
        return wave

    def _run(self, wave: list) -> None:
        if not wave:
            return
        r0, start, m = wave[0].request, time.monotonic(), self.metrics
        try:
            items, scores = self.backend.run([j.request.history for j in wave], r0.mode,
                                             r0.num_beams, r0.score)
            compute = time.monotonic() - start
            m.batch_compute_seconds.observe(compute)
            m.batch_size.observe(len(wave))
            m.batch_rows.observe(len(wave) * r0.num_beams)
            for i, job in enumerate(wave):
                m.queue_wait_seconds.observe(start - job.arrival)
                k = job.request.top_k
                _settle(job, Answer(np.asarray(items[i][:k]).tolist(),
                                    np.asarray(scores[i][:k], dtype=float).tolist(),
                                    start - job.arrival, compute, len(wave),
                                    len(wave) * r0.num_beams))
        except Exception as e:  # noqa: BLE001: the wave's requests get a 500, the engine lives
            for job in wave:
                _settle(job, error=ServeError(500, "internal", f"the wave failed: "
                                                              f"{type(e).__name__}: {e}"))
        finally:
            with self._cond:
                self._running = 0
                self._cond.notify_all()
