"""`gream-fast train sft` and `gream-fast train srpo`. Torch and transformers are imported when a
command runs, not when the parser is built."""
import json
import os


def report(summary: dict) -> None:
    """Print a run's summary; under torchrun only rank 0 does."""
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2))


def add_cli(subparsers) -> None:
    """Register the `train` group and its `sft` and `srpo` commands on the top-level subparsers."""
    from gream_fast.config import add_fields, from_args
    from gream_fast.train.sft import HELP, SFTConfig

    train = subparsers.add_parser("train", help="training stages: sft, srpo")
    stages = train.add_subparsers(dest="action", required=True)
    p = stages.add_parser("sft", help="supervised fine-tuning on the curriculum rows, in order")
    add_fields(p, SFTConfig, required=("data", "out"), choices={"init": ("tiny",)}, help=HELP)

    def sft_main(args):
        from gream_fast.train.sft import train

        report(train(from_args(SFTConfig, args)))

    p.set_defaults(run=sft_main)

    from gream_fast.train.srpo import CREDITS, REWARDS, ROLLOUTS
    from gream_fast.train.srpo_loop import HELP as SRPO_HELP, MODES, SRPOConfig

    q = stages.add_parser("srpo", help="SRPO reinforcement learning from an SFT'd model "
                                       "(METHOD.md section 5)")
    add_fields(q, SRPOConfig, required=("model", "data", "index", "out"),
               choices={"mode": MODES, "score": ("full", "sid"), "rollout": ROLLOUTS,
                        "credit": CREDITS, "reward": REWARDS},
               help=SRPO_HELP)

    def srpo_main(args):
        from gream_fast.train.srpo_loop import train

        report(train(from_args(SRPOConfig, args)))

    q.set_defaults(run=srpo_main)
