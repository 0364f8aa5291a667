"""Generation on our decoder runner: trie-constrained beam search (recommend) and constrained
sampling (sample, for SRPO rollouts), reasoning mode (reason_and_recommend)."""
from gream_fast.generate.beam import BeamResult, beam_search
from gream_fast.generate.constraint import SIDConstraint
from gream_fast.generate.reasoning import ReasoningResult, reason_and_recommend
from gream_fast.generate.recommend import recommend
from gream_fast.generate.sample import Rollouts, sample

__all__ = ["BeamResult", "ReasoningResult", "Rollouts", "SIDConstraint", "beam_search",
           "reason_and_recommend", "recommend", "sample"]
