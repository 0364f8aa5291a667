"""Model side: the decoder runner (our own prefill/decode for Qwen3, Qwen2, Llama) and the HF
fallback with the same interface."""
from gream_fast.model.runner import DecoderRunner, HFRunner, make_runner, supports

__all__ = ["DecoderRunner", "HFRunner", "make_runner", "supports"]
