"""Evaluation: Recall@K / NDCG@K (metrics) and the evaluation runner (evaluate). Importing it
does not import torch; evaluate() does, when called."""
from gream_fast.eval.evaluate import evaluate
from gream_fast.eval.metrics import recall_ndcg

__all__ = ["evaluate", "recall_ndcg"]
