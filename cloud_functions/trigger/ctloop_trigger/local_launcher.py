"""Local launch: ledger claim, optional mirror of the batch into the landing area, detached pipeline run
(``ctloop.local_launch.launch_once``, the same mechanism the monitoring pipeline's launch step uses).

A schedule tick has no batch: nothing is mirrored for it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ctloop.launch_ledger import Ledger
from ctloop.local_launch import launch_once
from ctloop_trigger.jobs import LaunchRequest
from ctloop_trigger.logs import log
from ctloop_trigger.mirror import mirror_batch
from ctloop_trigger.settings import TriggerSettings

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def launch_argv(settings: TriggerSettings, request: LaunchRequest) -> list[str]:
    """The command configured for the request's pipeline with its placeholders filled; each value stays one argv
    element (no shell). ``{input}``: the mirrored batch a scoring run reads ("" for a tick)."""
    values = {"python": sys.executable, "config": settings.resolve_bundle_path(settings.config),
              "run_id": request.job_id, "trigger_uri": request.trigger_uri,
              "snapshot_time": request.snapshot_time, "input": mirrored_batch(settings, request)}
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in settings.target(request.pipeline).command]


def mirrored_batch(settings: TriggerSettings, request: LaunchRequest) -> str:
    """Where the mirror puts the request's batch (folder or object); "" without a batch or a mirror."""
    if not (request.bucket and settings.mirror_dir):
        return ""
    return str(Path(settings.mirror_dir).resolve() / request.batch[len(f"gs://{request.bucket}/"):])


class LocalLauncher:
    """Exactly one detached pipeline process per job id, recorded in ``<state_dir>/ledger.sqlite``."""

    def __init__(self, settings: TriggerSettings) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir).resolve()
        self.logs_dir = self.state_dir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.state_dir / "ledger.sqlite", timeout=settings.ledger_timeout,
                             claim_seconds=settings.claim_seconds)

    def launch(self, request: LaunchRequest) -> bool:
        """True when this call started the run, False when it had been started already. Raises to retry."""

        def command() -> list[str]:
            if self.settings.mirror_dir and request.bucket:
                mirror_batch(request, self.settings)
            return launch_argv(self.settings, request)

        def report(what: str, exc: Exception) -> None:
            log("ERROR", what, job_id=request.job_id, error=repr(exc))

        def exited(code: int) -> None:
            log("INFO" if code == 0 else "ERROR", "pipeline process exited", job_id=request.job_id, exit_code=code)

        # job ids are [a-z0-9-]: safe as a file name
        return launch_once(self.ledger, request.job_id, request.trigger_uri, command,
                           self.logs_dir / f"{request.job_id}.log", cwd=self.settings.launch_cwd or None,
                           wait=self.settings.ledger_timeout, record_exit=True, on_error=report, on_exit=exited)
