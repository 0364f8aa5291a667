"""Training: the SFT loop and its chunked cross-entropy; SRPO's pieces (reward, shared-prefix
packing, loss, one step: train.srpo) and its loop (`gream-fast train srpo`: train.srpo_loop)."""
from gream_fast.train.distributed import shard_model
from gream_fast.train.loss import chunked_cross_entropy
from gream_fast.train.rewards import sid_reward
from gream_fast.train.sft import SFTConfig, train as train_sft
from gream_fast.train.srpo_loop import SRPOConfig, train as train_srpo

__all__ = ["SFTConfig", "SRPOConfig", "chunked_cross_entropy", "shard_model", "sid_reward",
           "train_sft", "train_srpo"]
