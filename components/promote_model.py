"""Register the trained model and move the registry aliases through the promotion gate.

The candidate (`promote.candidate`, the co-trained model by default) is logged as the recognition pyfunc
and registered as `promote.model_name` with alias `challenger`. The gate then evaluates the registered
artifact itself on the current test split, never the figures in reports/<mode>/metrics.json, which
nothing ties to the model (a mismatching `model_sha256` there is reported as a warning). The candidate
becomes `champion` only if it passes `sicot.tracking.promotion_decision` against the champion,
re-evaluated on the same split.

MLflow has no compare-and-set on aliases, so promotions of one model name take turns under a lease on
`paths.models/.locks/` (shared storage on a cluster); one that waits longer than `--lock-wait` fails
naming the holder, having registered nothing. In its turn a promotion registers and evaluates the
candidate, resolves the champion alias once to a version, evaluates exactly that version, and moves the
alias only if it still names that version (otherwise it judges the candidate again against the new
one). The decision, both sets of numbers, the version compared against and the sha256 of the evaluated
artifact are written as version tags and to the step's run. `--dry-run` evaluates the local candidate file,
prints the decision and changes nothing.
"""
from __future__ import annotations

import json
import socket
import sys
import tempfile

from sicot import storage, tracking
from sicot.config import Params

LOCK_TTL_S = 120.0  # a crashed promoter blocks the others this long at most; renewed while alive
LOCK_WAIT_S = 1800.0  # a turn evaluates the champion: minutes on a large test split
RECHECKS = 3  # an alias moved by hand (outside the lease) this many times in a row is an error


def lock_uri(params: Params, name: str) -> str:
    return storage.join(params.paths.models, ".locks", f"promote-{name}.json")


def evaluate_registered(name: str, version: str, params: Params) -> tuple[dict, str]:
    """(metrics, sha256) of the model file inside registered version `version` of `name`."""
    from sicot.evaluate import evaluate_model_file, model_sha256

    with tempfile.TemporaryDirectory(prefix="sicot-promote-") as tmp:
        model_file = next(tracking.registered_model_dir(name, version, tmp).rglob("model.pt"), None)
        if model_file is None:
            raise FileNotFoundError(f"models:/{name}/{version}: the registered model holds no model.pt")
        return evaluate_model_file(str(model_file), params), model_sha256(str(model_file))


def check_metrics_file(metrics_path: str, sha256: str) -> str | None:
    """A warning, also printed, when metrics.json describes other bytes than the candidate's."""
    found = json.loads(storage.read_text(metrics_path)).get("model_sha256", "missing")
    if found == sha256:
        return None
    warning = (f"{metrics_path} does not describe the candidate (its model_sha256 is {found}, the candidate's "
               f"{sha256}): its figures are ignored; the gate decides on its own evaluation")
    print(f"WARNING: {warning}", file=sys.stderr)
    return warning


def judge(name: str, version: str | None, candidate: dict, params: Params) -> dict:
    """The gate's verdict on `candidate` against champion `version` (None: no champion yet)."""
    champion, champion_sha = evaluate_registered(name, version, params) if version else (None, None)
    promote, reason = tracking.promotion_decision(candidate, champion, params.promote.max_tail_drop)
    return {"promote": promote, "reason": reason, "champion_version": version, "champion": champion,
            "champion_sha256": champion_sha}


def champion_version(name: str) -> str | None:
    found = tracking.alias_version(name, "champion")
    return str(found.version) if found else None


def run(params: Params, dry_run: bool = False, lock_wait_s: float = LOCK_WAIT_S) -> dict:
    name, mode = params.promote.model_name, params.promote.candidate
    model_dir = tracking.trained_models(params).get(mode, storage.join(params.paths.models, mode))
    model_path = storage.join(model_dir, "model.pt")
    metrics_path = storage.join(params.paths.reports, mode, "metrics.json")
    for path in (model_path, metrics_path):
        if not storage.exists(path):
            raise FileNotFoundError(f"{path}: missing; train and evaluate the {mode} model first")
    tracking.setup()
    if dry_run:
        from sicot.evaluate import evaluate_model_file, model_sha256

        sha256, candidate = model_sha256(model_path), evaluate_model_file(model_path, params)
        warning = check_metrics_file(metrics_path, sha256)
        verdict = judge(name, champion_version(name), candidate, params)
        return outcome(name, mode, candidate, sha256, verdict, warning) | {"dry_run": True}

    from sicot.lease import lease
    from sicot.serving import log_service

    with tracking.step_run("promote_model", params, ("promote", "serve")) as step, \
            lease(lock_uri(params, name), f"{socket.gethostname()} promoting {name} (run {step.info.run_id})",
                  ttl_s=LOCK_TTL_S, wait_s=lock_wait_s) as held:
        info = log_service(model_path, params, name=name, registered_model_name=name)
        version = str(info.registered_model_version)
        tracking.set_alias(name, "challenger", version)
        candidate, sha256 = evaluate_registered(name, version, params)
        warning = check_metrics_file(metrics_path, sha256)
        verdict = judge(name, champion_version(name), candidate, params)
        for _ in range(RECHECKS):
            held.renew()  # raises if the lease was lost: another promoter may be moving the alias now
            now = champion_version(name)
            if now == verdict["champion_version"]:
                break
            verdict = judge(name, now, candidate, params)  # moved outside the lease: decide again
        else:
            raise RuntimeError(f"{name}: the champion alias kept moving while version {version} was judged; "
                               f"something moves it without taking the lease {lock_uri(params, name)}")
        if verdict["promote"]:
            tracking.set_alias(name, "champion", version)
        result = outcome(name, mode, candidate, sha256, verdict, warning)
        tracking.tag_version(name, version, version_tags(result, candidate))
        tracking.log_metrics({"candidate_top1": candidate["top1"], "candidate_tail_top1": candidate["tail"]["top1"],
                              "promoted": verdict["promote"]})
        tracking.log_dict(result | {"version": version}, "promotion.json")
    print(f"promote_model: {name} version {version} ({mode}, top-1 {candidate['top1']:.3f}, tail top-1 "
          f"{candidate['tail']['top1']:.3f}) -> {'champion' if verdict['promote'] else 'challenger only'}: "
          f"{verdict['reason']}", file=sys.stderr)
    return result | {"version": version, "model_uri": f"models:/{name}/{version}"}


def outcome(name: str, mode: str, candidate: dict, sha256: str, verdict: dict, warning: str | None) -> dict:
    result = {"model": name, "candidate": mode, "promote": verdict["promote"], "reason": verdict["reason"],
              "candidate_top1": candidate["top1"], "candidate_tail_top1": candidate["tail"]["top1"],
              "model_sha256": sha256, "champion_version": verdict["champion_version"]}
    if verdict["champion"]:
        result |= {"champion_top1": verdict["champion"]["top1"],
                   "champion_tail_top1": verdict["champion"]["tail"]["top1"],
                   "champion_model_sha256": verdict["champion_sha256"]}
    return result | ({"warning": warning} if warning else {})


def version_tags(result: dict, candidate: dict) -> dict:
    tags = {"promotion.decision": "champion" if result["promote"] else "rejected", "promotion.reason": result["reason"],
            "candidate": result["candidate"], "top1": candidate["top1"], "tail_top1": candidate["tail"]["top1"],
            "head_top1": candidate["head"]["top1"], "model_sha256": result["model_sha256"]}
    if result["champion_version"]:
        tags |= {"champion.version": result["champion_version"], "champion.top1": result["champion_top1"],
                 "champion.tail_top1": result["champion_tail_top1"],
                 "champion.model_sha256": result["champion_model_sha256"]}
    return tags


def main(argv: list[str] | None = None) -> None:
    from components.cli import main as cli

    def options(p) -> None:
        p.add_argument("--dry-run", action="store_true", help="print the decision, move no alias")
        p.add_argument("--lock-wait", dest="lock_wait_s", type=float, default=LOCK_WAIT_S,
                       help=f"seconds to wait for another promotion of the same model (default {LOCK_WAIT_S:.0f})")

    cli(run, __doc__.splitlines()[0], argv, extra=options,
        sections=("promote", "evaluate", "train", "serve", "paths"))


if __name__ == "__main__":
    main()
