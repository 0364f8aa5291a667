"""The server's Prometheus metrics, in a registry of their own (one per engine, so several
servers or tests in one process never share counts)."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

# seconds: 1 ms .. 60 s; counts: powers of two
_SECONDS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
_COUNTS = tuple(2 ** i for i in range(13))


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "gream_request_seconds", "Time from a request's arrival to its response",
            ["endpoint"], buckets=_SECONDS, registry=r)
        self.queue_wait_seconds = Histogram(
            "gream_queue_wait_seconds", "Time a recommendation waited for its wave",
            buckets=_SECONDS, registry=r)
        self.batch_compute_seconds = Histogram(
            "gream_batch_compute_seconds", "Compute time of one wave", buckets=_SECONDS,
            registry=r)
        self.batch_size = Histogram("gream_batch_size", "Prompts per wave", buckets=_COUNTS,
                                    registry=r)
        self.batch_rows = Histogram("gream_batch_rows", "Beam rows per wave (prompts x beams)",
                                    buckets=_COUNTS, registry=r)
        self.queue_depth = Gauge("gream_queue_depth", "Recommendations waiting for a wave",
                                 registry=r)
        self.running = Gauge("gream_running", "Recommendations in the wave being computed",
                             registry=r)
        self.requests = Counter("gream_requests", "HTTP requests answered, by endpoint and "
                                "status (499: the client left first)", ["endpoint", "status"],
                                registry=r)
        self.recommendations = Counter(
            "gream_recommendations", "Recommendations the engine accepted or refused (one per "
            "history, batches included), by outcome status", ["status"], registry=r)
        self.items_returned = Counter("gream_items_returned", "Items returned in responses",
                                      registry=r)
        self.invalid_items = Counter(
            "gream_invalid_items", "Returned items that are not distinct real items of the "
            "index (must stay 0)", registry=r)
        self.graph_captures = Gauge(
            "gream_cuda_graph_captures", "CUDA graphs captured by the decode runner so far "
            "(0 on CPU; flat after warm-up with static batches)", registry=r)
        self.eager_steps = Gauge(
            "gream_decode_eager_steps", "Direct-mode decode steps that found no CUDA graph and "
            "could not capture one (static batches on CUDA: a wave shape warm-up did not "
            "capture, a wave outside the KV pool); 0 on CPU", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
