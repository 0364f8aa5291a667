"""Serving: `gream-fast serve` (an HTTP endpoint over the engine: batched waves of trie-constrained
beam search, backpressure, deadlines, Prometheus metrics, a draining shutdown) and
`gream-fast bench-serve` (load it and check every answer).

engine.Engine is the core and needs no HTTP (tests drive it directly); app.build_app puts the
ASGI app on top; the HTTP extras are optional (requirements-serve.txt)."""
from gream_fast.serve.engine import Answer, Engine, EngineLimits
from gream_fast.serve.protocol import Limits, RecommendRequest, ServeError, parse_request

__all__ = ["Answer", "Engine", "EngineLimits", "Limits", "RecommendRequest", "ServeError",
           "parse_request"]
