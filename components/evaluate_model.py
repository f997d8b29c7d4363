"""Evaluate every trained model (`paths.models/*/model.pt`) on the test split.

Writes `reports/<model>/metrics.json` (top-1/top-3 overall, head/tail, many/medium/few, and the
`model_sha256` of the file evaluated),
`per_class.csv`, `per_class.png`, SICoT's word-attention view `attention.html` (on the demo world
with the share of attention on noise title words, also in metrics.json), and, when both the
baseline and the SICoT model exist, `reports/comparison.json` and `comparison.md`.
"""
from __future__ import annotations

import sys

from sicot.config import Params


def run(params: Params, track: bool = True, model: str | None = None, compare: bool = False) -> dict:
    """`model`: evaluate only that one (a DVC stage per model); `compare`: only rebuild the comparison
    from the stored metrics of both models."""
    from sicot import evaluate  # lazy: torch and torchvision take seconds to import

    if compare:
        table = evaluate.write_comparison(params)
        if table is None:
            raise evaluate.EvaluationError("comparison needs reports/baseline/metrics.json and "
                                           "reports/sicot/metrics.json: evaluate both models first")
        return {"comparison": table}
    outputs = evaluate.evaluate_all(params, track=track, only=model)
    scores = ", ".join(f"{name} top-1 {m['top1']:.3f} (tail {m['tail']['top1']:.3f})"
                       for name, m in outputs["models"].items())
    print(f"evaluate_model: {scores} on the test split -> {outputs['reports']}", file=sys.stderr)
    return outputs


def _options(p) -> None:
    p.add_argument("--no-track", dest="track", action="store_false", help="do not log to MLflow")
    p.add_argument("--model", help="evaluate only this model (e.g. baseline or sicot)")
    p.add_argument("--compare", action="store_true", help="only write reports/comparison.* from stored metrics")


def main(argv: list[str] | None = None) -> None:
    from components.cli import main as cli_main

    cli_main(run, __doc__.splitlines()[0], argv, extra=_options, sections=("evaluate", "train", "data", "paths"))


if __name__ == "__main__":
    main()
