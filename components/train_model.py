"""Train the baseline (visual only) or the SICoT model (`train.mode`) into `paths.models/<mode>/`.

Single process: `python -m components.train_model --set train.mode=baseline`.
Several processes or GPUs: `torchrun --nproc-per-node N -m components.train_model ...` (the same code;
only rank 0 writes). `--set train.resume=true` continues from the last epoch's checkpoint.
"""
from __future__ import annotations

from sicot.config import Params


def run(params: Params, track: bool = True) -> dict:
    from sicot.train import run_training  # lazy: torch and torchvision take seconds to import

    return run_training(params, track=track)


def main(argv: list[str] | None = None) -> None:
    from components.cli import main as cli_main

    cli_main(run, __doc__.splitlines()[0], argv, sections=("train", "evaluate", "paths"),
             extra=lambda p: p.add_argument("--no-track", dest="track", action="store_false",
                                            help="do not log to MLflow"))


if __name__ == "__main__":
    main()
