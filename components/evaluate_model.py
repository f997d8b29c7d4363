"""Evaluate every trained model (`paths.models/*/model.pt`) on the test split.

Writes `reports/<model>/metrics.json` (top-1/top-3 overall, head/tail, many/medium/few),
`per_class.csv`, `per_class.png`, SICoT's word-attention view `attention.html`, and, when both the
baseline and the SICoT model exist, `reports/comparison.json` and `comparison.md`.
"""
from __future__ import annotations

from sicot.config import Params


def run(params: Params, track: bool = True) -> dict:
    from sicot.evaluate import evaluate_all  # lazy: torch and torchvision take seconds to import

    return evaluate_all(params, track=track)


def main(argv: list[str] | None = None) -> None:
    from components.cli import main as cli_main

    cli_main(run, __doc__.splitlines()[0], argv, extra=lambda p: p.add_argument(
        "--no-track", dest="track", action="store_false", help="do not log to MLflow"))


if __name__ == "__main__":
    main()
