"""The ``ctloop`` command line: one entry point for developers and CI.

Every command reads the same settings (``--config``, default ./ctloop.yaml when present, plus ``--set KEY=VALUE``
overrides). Expected failures print one line naming the problem and exit non-zero.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from ctloop.config import Settings, load_settings
from ctloop.errors import CtloopError
from ctloop.threads import use_local_threads

DEFAULT_CONFIG = Path("ctloop.yaml")


def _fail_cleanly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected errors into one line on stderr and exit code 1 (click's usage errors keep exit 2)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise click.ClickException(f"settings: {where}: {first['msg']}") from exc
        except (CtloopError, ValueError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


class _Ctx:
    def __init__(self, config: Path | None, overrides: tuple[str, ...], workdir: str | None) -> None:
        self.config_path = config
        self.overrides = list(overrides)
        if workdir:
            self.overrides.append(f"local.workdir={workdir}")

    @functools.cached_property
    def settings(self) -> Settings:
        path = self.config_path
        if path is None and DEFAULT_CONFIG.is_file():
            path = DEFAULT_CONFIG
        return load_settings(path, self.overrides)


pass_ctx = click.make_pass_decorator(_Ctx)


def _devtools(module: str) -> Any:
    """A ``devtools`` module: development tooling, installed by ``make setup`` but never into the images."""
    import importlib

    try:
        return importlib.import_module(f"devtools.{module}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("devtools", f"devtools.{module}"):
            raise
        raise click.ClickException(
            f"this command needs the development tools (devtools.{module}), which only the development "
            "install has: run `make setup` in a ctloop checkout") from exc


@click.group()
@click.option("--config", "config", type=click.Path(path_type=Path), default=None,
              help="Settings YAML (default: ./ctloop.yaml if present, else built-in defaults).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a setting, e.g. model.seed=7.")
@click.option("--workdir", default=None, help="Local state directory (overrides local.workdir).")
@click.pass_context
def cli(ctx: click.Context, config: Path | None, overrides: tuple[str, ...], workdir: str | None) -> None:
    """ctloop: continuous training on Vertex AI, runnable locally on real engines."""
    ctx.obj = _Ctx(config, overrides, workdir)


@cli.command("sample-data")
@click.option("--rows", default=100_000, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=7, show_default=True)
@click.option("--drift", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Shift feature distributions and the label relation (0 = none, 1 = strong).")
@click.option("--concept-drift", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Change only the label relation, not the inputs (0 = none, 1 = strong).")
@click.option("--batch", default="base", show_default=True, help="Batch folder name under the landing table.")
@click.option("--if-missing", is_flag=True, help="Do nothing when the landing table already has data.")
@pass_ctx
@_fail_cleanly
def sample_data_cmd(ctx: _Ctx, rows: int, seed: int, drift: float, concept_drift: float, batch: str,
                    if_missing: bool) -> None:
    """Write the deterministic customer-churn sample data into the local landing area."""
    write_sample_data = _devtools("sample_data").write_sample_data
    s = ctx.settings
    table_dir = s.local.landing_dir / s.data.bq_dataset / s.data.bq_table
    if if_missing and any(table_dir.rglob("*.parquet")):
        click.echo(f"landing data already present in {table_dir}; leaving it as is")
        return
    result = write_sample_data(s.local.landing_dir, s, rows=rows, seed=seed, drift=drift, batch=batch,
                               concept_drift=concept_drift)
    click.echo(json.dumps(_plain(result), indent=2, default=str))


@cli.command("extract")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory (Parquet).")
@click.option("--run-id", default=None)
@click.option("--snapshot-time", default=None, help="ISO timestamp; the window ends here (default: now).")
@pass_ctx
@_fail_cleanly
def extract_cmd(ctx: _Ctx, out: Path, run_id: str | None, snapshot_time: str | None) -> None:
    """Run the extract step on its own."""
    from components.extract import run_extract
    from pipelines.local_run import new_run_id

    result = run_extract(ctx.settings, run_id=run_id or new_run_id("ctloop-extract"), output_path=str(out),
                         output_uri=str(out.resolve()), snapshot_time=snapshot_time)
    click.echo(json.dumps(_plain(result), indent=2, default=str))


@cli.command("transform")
@click.option("--input", "input_dir", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Writes train/ valid/ test/ here.")
@click.option("--run-id", default=None)
@pass_ctx
@_fail_cleanly
def transform_cmd(ctx: _Ctx, input_dir: Path, out: Path, run_id: str | None) -> None:
    """Run the transform step (the PySpark job) on its own."""
    from components.transform import run_transform
    from pipelines.local_run import new_run_id

    paths = {name: out / name for name in ("train", "valid", "test")}
    result = run_transform(
        ctx.settings, run_id=run_id or new_run_id("ctloop-transform"),
        input_path=str(input_dir), input_uri=str(input_dir.resolve()),
        train_path=str(paths["train"]), valid_path=str(paths["valid"]), test_path=str(paths["test"]),
        train_uri=str(paths["train"].resolve()), valid_uri=str(paths["valid"].resolve()),
        test_uri=str(paths["test"].resolve()), report_path=str(out / "data_quality.md"),
    )
    click.echo(json.dumps(_plain(result), indent=2, default=str))


@cli.command("run")
@click.option("--target", type=click.Choice(["local", "vertex"]), default="local", show_default=True)
@click.option("--run-id", default=None, help="Idempotency key: a run id that already succeeded is not run again.")
@click.option("--snapshot-time", default="", help="ISO timestamp the extract window ends at (default: now).")
@click.option("--trigger-uri", default="", help="The object that triggered this run (gs://bucket/object#generation).")
@click.option("--serve/--no-serve", default=True, show_default=True,
              help="After a local run, start the production endpoint's server and print a prediction.")
@click.option("--template", default=None, help="--target vertex: compiled YAML or Artifact Registry URI.")
@pass_ctx
@_fail_cleanly
def run_cmd(ctx: _Ctx, target: str, run_id: str | None, snapshot_time: str, trigger_uri: str, serve: bool,
            template: str | None) -> None:
    """Run the training pipeline: locally with the KFP local runner, or on Vertex AI Pipelines."""
    from pipelines.main_job import run_training_local
    from pipelines.submit import submit_training

    if target == "vertex":
        result = submit_training(ctx.settings, run_id=run_id, snapshot_time=snapshot_time,
                                 trigger_uri=trigger_uri, template=template)
        click.echo(f"{'submitted' if result.created else 'already submitted'}: {result.job_name}")
        return
    code = run_training_local(ctx.settings, run_id=run_id, snapshot_time=snapshot_time, trigger_uri=trigger_uri,
                              serve=serve, echo=click.echo)
    sys.exit(code)


@cli.command("doctor")
@click.option("--target", type=click.Choice(["vertex"]), default="vertex", show_default=True)
@click.option("--template", default=None, help="Artifact Registry tag URI of the training template.")
@pass_ctx
@_fail_cleanly
def doctor_cmd(ctx: _Ctx, target: str, template: str | None) -> None:
    """Check a real project before the first cloud run: APIs, buckets, repositories, template, permissions."""
    from pipelines.doctor import run_doctor

    report = run_doctor(ctx.settings, template=template)
    for line in report.failures:
        click.echo(line, err=True)
    for line in report.unverified:
        click.echo(f"not checked: {line}")
    click.echo(f"doctor: {report.passed} checks passed, {len(report.unverified)} not checked (listed above; "
               f"the Terraform tests cover them), {len(report.failures)} failed")
    sys.exit(1 if report.failures else 0)


@cli.command("monitor")
@click.option("--target", type=click.Choice(["local", "vertex"]), default="local", show_default=True)
@click.option("--run-id", default=None, help="Idempotency key: also keys the training run a drift launches.")
@click.option("--snapshot-time", default="", help="ISO timestamp the recent window ends at (default: now).")
@click.option("--trigger-uri", default="", help="What started this check (the new batch, or the schedule).")
@click.option("--template", default=None, help="--target vertex: compiled YAML or Artifact Registry URI.")
@pass_ctx
@_fail_cleanly
def monitor_cmd(ctx: _Ctx, target: str, run_id: str | None, snapshot_time: str, trigger_uri: str,
                template: str | None) -> None:
    """Check the recent data for drift against the champion; launch training when it drifted."""
    from pipelines.monitoring import run_monitoring_local
    from pipelines.submit import submit_monitoring

    if target == "vertex":
        result = submit_monitoring(ctx.settings, run_id=run_id, snapshot_time=snapshot_time,
                                   trigger_uri=trigger_uri, template=template)
        click.echo(f"{'submitted' if result.created else 'already submitted'}: {result.job_name}")
        return
    code, _ = run_monitoring_local(ctx.settings, run_id=run_id, snapshot_time=snapshot_time,
                                   trigger_uri=trigger_uri, echo=click.echo)
    sys.exit(code)


@cli.command("score")
@click.option("--target", type=click.Choice(["local", "vertex"]), default="local", show_default=True)
@click.option("--run-id", default=None, help="Idempotency key: a rerun replaces its own scores.")
@click.option("--snapshot-time", default="", help="ISO timestamp the scores are as of (default: now).")
@click.option("--model-version", default="", help="Registry version or alias (default: scoring.model_version).")
@click.option("--template", default=None, help="--target vertex: compiled YAML or Artifact Registry URI.")
@click.option("--trigger-uri", default="", help="What caused the run (the trigger passes the landed object).")
@click.option("--input", "input_uri", default="",
              help="Score this batch (a folder or Parquet file; gs:// on vertex) instead of the scoring window.")
@pass_ctx
@_fail_cleanly
def score_cmd(ctx: _Ctx, target: str, run_id: str | None, snapshot_time: str, model_version: str,
              template: str | None, trigger_uri: str, input_uri: str) -> None:
    """Score every entity's latest row with the champion (or --model-version); write the scores."""
    from pipelines.scoring import run_scoring_local
    from pipelines.submit import submit_scoring

    if target == "vertex":
        if input_uri and not input_uri.startswith("gs://"):
            raise CtloopError(f"--input {input_uri!r}: a run on vertex reads a batch in Cloud Storage (gs://...)")
        result = submit_scoring(ctx.settings, run_id=run_id, snapshot_time=snapshot_time, trigger_uri=trigger_uri,
                                model_version=model_version, input_uri=input_uri, template=template)
        click.echo(f"{'submitted' if result.created else 'already submitted'}: {result.job_name}")
        return
    code, _ = run_scoring_local(ctx.settings, run_id=run_id, snapshot_time=snapshot_time,
                                model_version=model_version, trigger_uri=trigger_uri, input_uri=input_uri,
                                echo=click.echo)
    sys.exit(code)


@cli.command("compile")
@click.option("--out", type=click.Path(path_type=Path), default=Path("build/pipelines"), show_default=True)
@click.option("--component-image", default=None, help="Image every component runs in (default: gcp.component_image).")
@pass_ctx
@_fail_cleanly
def compile_cmd(ctx: _Ctx, out: Path, component_image: str | None) -> None:
    """Compile every pipeline to YAML with the component image pinned."""
    from pipelines.compile import compile_all

    for path in compile_all(out, component_image or ctx.settings.gcp.component_image, ctx.settings.resources):
        click.echo(str(path))


@cli.command("submit")
@click.option("--template", default=None, help="Compiled YAML or Artifact Registry URI (default: compile now).")
@click.option("--run-id", default=None, help="Idempotency key; the same key never creates a second job.")
@click.option("--snapshot-time", default="")
@click.option("--trigger-uri", default="")
@click.option("--cache/--no-cache", default=None, help="Reuse cached step results (default: no).")
@pass_ctx
@_fail_cleanly
def submit_cmd(ctx: _Ctx, template: str | None, run_id: str | None, snapshot_time: str, trigger_uri: str,
               cache: bool | None) -> None:
    """Submit the training pipeline to Vertex AI Pipelines."""
    from pipelines.submit import submit_training

    caching = {} if cache is None else {"enable_caching": cache}  # default: no cache, as every launch
    result = submit_training(ctx.settings, run_id=run_id, snapshot_time=snapshot_time, trigger_uri=trigger_uri,
                             template=template, **caching)
    click.echo(f"{'submitted' if result.created else 'already submitted'}: {result.job_name}")


@cli.command("demo")
@click.option("--rows", default=20_000, show_default=True, type=click.IntRange(min=1000))
@click.option("--drift", default=0.6, show_default=True, type=click.FloatRange(0.0, 1.0))
@click.option("--seed", default=7, show_default=True)
@pass_ctx
@_fail_cleanly
def demo_cmd(ctx: _Ctx, rows: int, drift: float, seed: int) -> None:
    """The whole loop on local emulators: upload, trigger, train, deploy, drifted batch, retrain, predict."""
    run_demo = _devtools("demo").run_demo
    sys.exit(run_demo(ctx.settings, rows=rows, drift=drift, seed=seed, echo=click.echo))


@cli.command("serve")
@click.option("--endpoint", default=None, help="Endpoint name (default: deploy.production_endpoint).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True)
@pass_ctx
@_fail_cleanly
def serve_cmd(ctx: _Ctx, endpoint: str | None, host: str, port: int) -> None:
    """Serve an endpoint's deployed models locally (honours its traffic split)."""
    use_local_threads(ctx.settings)  # before scikit-learn loads its OpenMP runtime
    from ctloop.registry import LocalRegistry
    from serving.app import serve_endpoint

    s = ctx.settings
    from serving.prediction_log import config_from_settings

    name = endpoint or s.deploy.production_endpoint
    registry = LocalRegistry(s.local.registry_db)
    deployed = registry.get_endpoint(name)
    if deployed is None or not deployed.deployments:
        raise CtloopError(f"endpoint {name!r}: no model is deployed to it yet (registry {s.local.registry_db}); "
                          f"`ctloop run` deploys one once a candidate passes the gate")
    _check_port_free(host, port)
    from ctloop.online_store import SQLiteStore, local_store_path

    serve_endpoint(registry, name, host, port, prediction_log=config_from_settings(s, name),
                   online_store=SQLiteStore(local_store_path(s)))


@cli.command("canary")
@click.option("--requests", default=0, show_default=True, type=click.IntRange(min=0),
              help="Local backend: first send this many requests to the local production endpoint (loopback only).")
@click.option("--rows", type=click.Path(path_type=Path, exists=True), default=None,
              help="With --requests: a test split (Parquet) whose rows are sent and whose labels then 'arrive'.")
@pass_ctx
@_fail_cleanly
def canary_cmd(ctx: _Ctx, requests: int, rows: Path | None) -> None:
    """Judge the canary on the prediction log: promote a step, roll back or hold (docs/monitoring.md)."""
    use_local_threads(ctx.settings)
    from components.canary import judge

    s = ctx.settings
    if requests:
        _send_traffic(s, requests, rows)
    outcome = judge(s)
    click.echo(f"canary: {outcome.decision}" + (f" (canary {outcome.canary}, champion {outcome.champion})"
                                                 if outcome.canary else " (no canary on the production endpoint)"))
    if outcome.verdict is not None:
        for reason in outcome.verdict.reasons:
            click.echo(f"  {reason}")
    click.echo(f"split: {outcome.split_before} -> {outcome.split_after}"
               + ("; the canary is champion now" if outcome.became_champion else ""))


def _send_traffic(s: Settings, requests: int, rows: Path | None) -> None:
    import pandas as pd

    from ctloop.smoke import smoke_instances
    from ctloop.traffic import drive, serving_production, write_labels

    if s.backend != "local":
        raise CtloopError("canary --requests: the traffic generator drives the local endpoint only "
                          "(backend: local); in the cloud the endpoint's live traffic is judged")
    if rows is None:
        raise CtloopError("canary --requests: give --rows, a test split (Parquet) to send rows from")
    instances = smoke_instances(s, rows, requests)
    with serving_production(s) as url:
        sent = drive(url, instances, requests, s.canary.max_requests_per_second)
    click.echo(f"sent {sent.sent} requests ({sent.failed} failed): {sent.answered_by}")
    label = s.columns.label_column
    frame = pd.read_parquet(rows)
    if label in frame.columns:
        values = frame[label].head(len(instances)).tolist()
        write_labels(s, sent.request_ids, [int(values[i % len(values)]) for i in range(sent.sent)])


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise CtloopError(f"serve: cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from exc


@cli.command("registry")
@pass_ctx
@_fail_cleanly
def registry_cmd(ctx: _Ctx) -> None:
    """List models, versions and aliases in the local registry."""
    from ctloop.registry import LocalRegistry

    reg = LocalRegistry(ctx.settings.local.registry_db)
    if not reg.list_models():
        click.echo(f"no models registered yet in {ctx.settings.local.registry_db}")
    for model in reg.list_models():
        name = getattr(model, "name", model)
        click.echo(f"{name}")
        for v in reg.list_versions(name):
            aliases = ",".join(getattr(v, "aliases", []) or [])
            click.echo(f"  v{v.version_id}  {aliases:<30} {v.artifact_uri}")


@cli.command("endpoints")
@pass_ctx
@_fail_cleanly
def endpoints_cmd(ctx: _Ctx) -> None:
    """List local endpoints and their traffic split."""
    from ctloop.registry import LocalRegistry

    s = ctx.settings
    reg = LocalRegistry(s.local.registry_db)
    for name in (s.deploy.staging_endpoint, s.deploy.production_endpoint):
        ep = reg.get_endpoint(name)
        click.echo(name if ep and ep.deployments else f"{name}  (nothing deployed)")
        for d in getattr(ep, "deployments", []) if ep else []:
            click.echo(f"  {d.deployed_model_id}  {d.model} v{d.version}  {d.traffic_percent}%")


def _plain(obj: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) else obj


def main() -> None:
    cli(prog_name="ctloop")


if __name__ == "__main__":
    main()
