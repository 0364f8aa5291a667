"""Training: the SFT loop and its chunked cross-entropy; SRPO's pieces (reward, shared-prefix
packing, loss, one step: train.srpo); the `gream-fast train srpo` loop is to come."""
from gream_fast.train.loss import chunked_cross_entropy
from gream_fast.train.rewards import sid_reward
from gream_fast.train.sft import SFTConfig, train as train_sft

__all__ = ["SFTConfig", "chunked_cross_entropy", "sid_reward", "train_sft"]
