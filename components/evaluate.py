"""evaluate_gate: score the candidate and the champion on the same test rows, then apply the promotion gate.

The champion comes in as its model directory's URI (``''`` for the first model). A champion that cannot be
scored stops the step with a ``ChampionError``: a broken comparison must never pass by default. One that cannot
be loaded at all (another scikit-learn minor, a pickle that no longer unpickles) does too, unless
``gate.unloadable_champion`` is "replace": then the candidate is judged as a first model and the champion check
says why.
The candidate's ONNX export is checked against scikit-learn on the test split; the verdict is written beside
the model (``onnx_check.json``), which decides whether the prediction server uses it.
Outputs: test metrics, ROC curve + confusion matrix, a Markdown report, and the decision as step outputs.
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from kfp.dsl import ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

# The executor imports this module with _KFP_RUNTIME=true, under which ``kfp.dsl`` leaves out its compile-time
# half (``dsl.component`` among it): take the decorator from its own module so both work.
from kfp.dsl.component_decorator import component

from components.images import COMPONENT_IMAGE
from ctloop.config import Settings
from ctloop.errors import ChampionError, CtloopError, ModelLoadError
from ctloop.features import FeatureSpec
from ctloop.gate import GateDecision, decide
from ctloop.metrics import classification_metrics, confusion, pr_curve_points, roc_curve_points
from ctloop.model_runtime import ONNX_CHECK_FILE, LoadedModel, check_onnx_agreement, load_model
from ctloop.modeling import data_checksum, read_split
from ctloop.paired import paired_difference

# Step output ``champion_metric`` when there is no champion (every gate metric lies in [0, 1]).
NO_CHAMPION_METRIC = -1.0
_GCS_FUSE_ROOT = "/gcs/"


@component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def evaluate_gate(
    config: dict,
    run_id: str,
    model: Input[Model],
    test: Input[Dataset],
    champion_uri: str,
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    report: Output[Markdown],
) -> NamedTuple("Outputs", decision=str, primary_metric=float, champion_metric=float, reasons=str):
    """Candidate vs champion on the test split; decision "pass"/"fail", reasons a JSON list of checks."""
    from components.evaluate import run_evaluate_step
    from ctloop.steps import run_step

    return run_step(run_evaluate_step, config, run_id, model, test, champion_uri, metrics, classification,
                    report)


@dataclass(frozen=True)
class EvaluationResult:
    candidate_metrics: dict[str, float | int]
    champion_metrics: dict[str, float | int] | None
    decision: GateDecision
    roc: dict[str, list[float]]
    pr: dict[str, list[float]]
    confusion: list[list[int]]
    champion_dir: str | None
    test_checksum: str
    onnx_check: dict[str, Any] | None = None
    champion_unloadable: str = ""  # why the champion could not be loaded, when gate.unloadable_champion replaced it

    @property
    def markdown(self) -> str:
        return render_report(self)


def champion_path(uri: str) -> str | None:
    """The local path of a champion model URI: ``gs://b/p`` -> ``/gcs/b/p`` (the Vertex FUSE mount)."""
    uri = (uri or "").strip()
    if not uri:
        return None
    if uri.startswith("gs://"):
        return _GCS_FUSE_ROOT + uri[len("gs://"):]
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return uri


def _score_champion(champion_dir: str, test: Any, test_dir: str | Path,
                    label: str) -> tuple[dict[str, float | int], LoadedModel, Any]:
    where = f"champion model {champion_dir}"
    try:
        champion = load_model(champion_dir, runtime="sklearn")
    except CtloopError as exc:
        raise ChampionError(f"{where} cannot be loaded: {exc}") from exc
    if champion.spec.label_column != label:
        raise ChampionError(
            f"{where} predicts {champion.spec.label_column!r} but the test split {test_dir} "
            f"is labelled {label!r}"
        )
    missing = [c for c in champion.features if c not in test.columns]
    if missing:
        raise ChampionError(
            f"{where} needs feature column(s) {missing} that the test split {test_dir} does not have; "
            f"test columns: {list(test.columns)}"
        )
    try:
        proba = champion.predict_proba(test)
        scored = classification_metrics(test[label].to_numpy(), proba, champion.threshold)
    except Exception as exc:  # anything the champion's own pipeline raises on these rows
        raise ChampionError(
            f"{where} cannot score the test split {test_dir}: {type(exc).__name__}: {exc}"
        ) from exc
    return scored, champion, proba


def run_evaluate(settings: Settings, model_dir: str | Path, test_dir: str | Path,
                 champion_dir: str | None) -> EvaluationResult:
    """Score the candidate (and the champion, if any) on the test split and decide with ``settings.gate``.

    Each model is scored at its own card's threshold, as it would be served. Raises ChampionError when the
    champion is given but cannot be scored, or cannot be loaded and ``gate.unloadable_champion`` is "fail".
    Writes the ONNX agreement verdict into ``model_dir`` (``onnx_check.json``).
    """
    spec = FeatureSpec.read(test_dir)
    test = read_split(test_dir, spec, "test")
    y = test[spec.label_column].to_numpy()
    candidate = load_model(model_dir, runtime="sklearn")
    proba = candidate.predict_proba(test)
    cand_metrics = classification_metrics(y, proba, candidate.threshold)
    onnx_check = check_onnx_agreement(candidate, test, f"the test split ({len(test)} rows)")
    _write_json(Path(model_dir) / ONNX_CHECK_FILE, onnx_check)

    champ_metrics = comparison = None
    unloadable = ""
    if champion_dir:
        try:
            champ_metrics, champion, champ_proba = _score_champion(champion_dir, test, test_dir, spec.label_column)
        except ChampionError as exc:
            if settings.gate.unloadable_champion != "replace" or not _is_load_failure(exc):
                raise
            unloadable = str(exc)
        else:
            g = settings.gate
            comparison = paired_difference(y, proba, champ_proba, g.primary_metric, g.alpha,
                                           samples=g.bootstrap_samples, seed=g.seed,
                                           thresholds=(candidate.threshold, champion.threshold))
    decision = decide(cand_metrics, champ_metrics, settings.gate, comparison)
    if unloadable:
        decision = _replaced_champion(decision, unloadable)
    return EvaluationResult(
        candidate_metrics=cand_metrics,
        champion_metrics=champ_metrics,
        decision=decision,
        roc=roc_curve_points(y, proba),
        pr=pr_curve_points(y, proba),
        confusion=confusion(y, proba, candidate.threshold),
        champion_dir=champion_dir,
        test_checksum=data_checksum(test),
        onnx_check=onnx_check,
        champion_unloadable=unloadable,
    )


def _is_load_failure(exc: ChampionError) -> bool:
    return isinstance(exc.__cause__, ModelLoadError)


def _replaced_champion(decision: GateDecision, reason: str) -> GateDecision:
    """The first-model decision, its champion check saying which champion was set aside and why."""
    message = (f"champion replaced (gate.unloadable_champion=replace): {reason}; "
               f"the candidate is judged as a first model")
    reasons = [{**r, "check": "champion_unloadable", "message": message} if r["check"] == "champion" else r
               for r in decision.reasons]
    return replace(decision, reasons=reasons)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def render_report(result: EvaluationResult) -> str:
    """Markdown: the decision, candidate vs champion metrics, and every gate check with its numbers."""
    d = result.decision
    cand, champ = result.candidate_metrics, result.champion_metrics
    lines = [
        f"# Gate decision: **{d.decision.upper()}**",
        "",
        f"Primary metric `{d.primary_metric}`: candidate {_fmt(d.candidate_value)}, "
        f"champion {_fmt(d.champion_value) if champ is not None else 'none (first model)'}.",
        f"Test split: {cand['n']} rows, checksum `{result.test_checksum}`.",
    ]
    if d.comparison is not None:
        c = d.comparison
        lines.append(f"Paired comparison ({c['method']}, same {c['n']} rows): candidate - champion = "
                     f"{c['difference']:+.4f}, {100 * (1 - 2 * c['alpha']):.0f}% interval "
                     f"[{c['lower']:+.4f}, {c['upper']:+.4f}] (standard error {c['standard_error']:.4f}).")
    if d.champion_below_floors:
        lines.append("")
        lines.append("> **ALERT: the serving champion is below the gate's floors on this test split** "
                     "(see the champion_* checks); a candidate that clears them replaces it.")
    lines += [
        "",
        "## Metrics on the test split",
        "",
        "| metric | candidate | champion |",
        "|---|---:|---:|",
    ]
    for name, value in cand.items():
        lines.append(f"| {name} | {_fmt(value)} | {_fmt(champ.get(name)) if champ else '–'} |")
    lines += ["", "## Gate checks", "",
              "| check | metric | value | comparator | threshold | result | detail |",
              "|---|---|---:|:---:|---:|---|---|"]
    for r in d.reasons:
        result_text = "**ALERT**" if r.get("alert") else ("pass" if r["passed"] else "**FAIL**")
        lines.append(f"| {r['check']} | {r['metric']} | {_fmt(r['value'])} | {r['comparator']} "
                     f"| {_fmt(r['threshold'])} | {result_text} | {r['message']} |")
    failed = len(d.failed)
    lines += ["", f"{failed} of {len(d.reasons)} checks failed." if failed else "All checks passed."]
    if result.champion_unloadable:
        lines += ["", "## Champion", "", f"The champion could not be loaded and was set aside "
                  f"(`gate.unloadable_champion: replace`): {result.champion_unloadable}"]
    if result.onnx_check is not None:
        lines += ["", "## Serving runtime", "", _runtime_line(result.onnx_check)]
    return "\n".join(lines) + "\n"


def _runtime_line(check: dict[str, Any]) -> str:
    if check.get("agrees"):
        return (f"ONNX Runtime: the ONNX export agrees with scikit-learn on {check['checked_on']} (largest "
                f"probability difference {check['max_abs_diff']:.2g} <= {check['tolerance']:g}).")
    return f"scikit-learn: the ONNX export is not served because {check.get('reason')}."


def run_evaluate_step(config: dict, run_id: str, model: Any, test: Any, champion_uri: str, metrics: Any,
                      classification: Any, report: Any) -> tuple[str, float, float, str]:
    """The component body: evaluate, fill the output artifacts, return the step outputs."""
    settings = Settings.from_param(config)
    result = run_evaluate(settings, model.path, test.path, champion_path(champion_uri))
    d = result.decision

    for name, value in result.candidate_metrics.items():
        metrics.log_metric(name, value)
    for name, value in (result.champion_metrics or {}).items():
        metrics.log_metric(f"champion_{name}", value)
    if d.comparison is not None:
        for key in ("difference", "lower", "upper", "standard_error"):
            metrics.log_metric(f"paired_{key}", d.comparison[key])
        metrics.log_metric("champion_below_floors", int(d.champion_below_floors))
    metrics.metadata.update({"split": "test", "run_id": run_id, "decision": d.decision,
                             "primary_metric": d.primary_metric, "champion_uri": champion_uri or "",
                             "test_checksum": result.test_checksum,
                             "serving_runtime": _runtime_line(result.onnx_check or {}),
                             "champion_unloadable": result.champion_unloadable,
                             "champion_below_floors": d.champion_below_floors})

    classification.log_roc_curve(result.roc["fpr"], result.roc["tpr"], result.roc["thresholds"])
    classification.log_confusion_matrix(["0", "1"], result.confusion)
    # Not drawn by the Vertex UI, but kept with the artifact so reports can plot the PR curve.
    classification.metadata["prCurve"] = {"precision": result.pr["precision"], "recall": result.pr["recall"]}

    out = Path(report.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(result.markdown)
    tmp.replace(out)
    report.metadata.update({"run_id": run_id, "decision": d.decision})

    champion_value = d.champion_value if d.champion_value is not None else NO_CHAMPION_METRIC
    return d.decision, float(d.candidate_value), float(champion_value), d.reasons_json()
