"""Register the trained model and move the registry aliases through the promotion gate.

The candidate (`promote.candidate`, the co-trained model by default) is logged as the recognition pyfunc
and registered as `promote.model_name` with alias `challenger`. It becomes `champion` only if, on the
same test set, it passes `sicot.tracking.promotion_decision`; the champion is re-evaluated on the
current test split so both numbers come from identical data. The decision and its numbers are written
as version tags and to the step's run. `--dry-run` prints the decision and changes nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

from sicot import storage, tracking
from sicot.config import Params


def _champion_metrics(params: Params, name: str) -> tuple[object, dict | None]:
    champion = tracking.alias_version(name, "champion")
    if champion is None:
        return None, None
    from mlflow.artifacts import download_artifacts

    from sicot.evaluate import evaluate_model_file

    local = Path(download_artifacts(f"models:/{name}@champion"))
    model_file = next(local.rglob("model.pt"))
    return champion, evaluate_model_file(str(model_file), params)


def run(params: Params, dry_run: bool = False) -> dict:
    name, mode = params.promote.model_name, params.promote.candidate
    model_path = storage.join(params.paths.models, mode, "model.pt")
    metrics_path = storage.join(params.paths.reports, mode, "metrics.json")
    for path in (model_path, metrics_path):
        if not storage.exists(path):
            raise FileNotFoundError(f"{path}: missing; train and evaluate the {mode} model first")
    candidate = json.loads(storage.read_text(metrics_path))
    tracking.setup()
    champion, champion_metrics = _champion_metrics(params, name)
    promote, reason = tracking.promotion_decision(candidate, champion_metrics, params.promote.max_tail_drop)
    outcome = {"model": name, "candidate": mode, "promote": promote, "reason": reason,
               "candidate_top1": candidate["top1"], "candidate_tail_top1": candidate["tail"]["top1"],
               "champion_version": champion.version if champion else None}
    if champion_metrics:
        outcome |= {"champion_top1": champion_metrics["top1"], "champion_tail_top1": champion_metrics["tail"]["top1"]}
    if dry_run:
        return outcome | {"dry_run": True}

    import mlflow

    from sicot.serving import log_service

    client = mlflow.MlflowClient()
    with tracking.step_run("promote_model", params, ("promote", "serve")):
        info = log_service(model_path, params, name=name, registered_model_name=name)
        version = str(info.registered_model_version)
        client.set_registered_model_alias(name, "challenger", version)
        tags = {"promotion.decision": "champion" if promote else "rejected", "promotion.reason": reason,
                "candidate": mode, "top1": candidate["top1"], "tail_top1": candidate["tail"]["top1"],
                "head_top1": candidate["head"]["top1"]}
        if champion_metrics:
            tags |= {"champion.version": champion.version, "champion.top1": champion_metrics["top1"],
                     "champion.tail_top1": champion_metrics["tail"]["top1"]}
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, str(value))
        if promote:
            client.set_registered_model_alias(name, "champion", version)
        mlflow.log_metrics({"candidate_top1": candidate["top1"], "candidate_tail_top1": candidate["tail"]["top1"],
                            "promoted": float(promote)})
        mlflow.log_dict(outcome | {"version": version}, "promotion.json")
    return outcome | {"version": version, "model_uri": f"models:/{name}/{version}"}


def main(argv: list[str] | None = None) -> None:
    from components.cli import main as cli

    cli(run, __doc__.splitlines()[0], argv,
        extra=lambda p: p.add_argument("--dry-run", action="store_true", help="print the decision, move no alias"))


if __name__ == "__main__":
    main()
