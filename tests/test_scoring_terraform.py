"""terraform/scoring.tf wired to the code that consumes it: the scoring schedule's ticks carry the attribute the
trigger function reads, on the cron the settings file names; the score prefix's notifications reach the same
function, which is told that prefix and the scoring template; the scoring batch can pull its image. (fmt,
checkov and the provider schema cover the file through tests/test_terraform.py and test_terraform_schema.py.)"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_monitoring_terraform import check_ticks_reach_the_function
from tests.test_terraform import block, load_config, referenced, resources
from tests.trigger_helpers import bundle_on_sys_path

bundle_on_sys_path()

from ctloop_trigger.schedule import SCHEDULE_ATTRIBUTE, SCHEDULES  # noqa: E402
from ctloop_trigger.settings import load_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg() -> dict[str, Any]:
    return load_config()


def _function_env(cfg: dict[str, Any]) -> str:
    (function,) = resources(cfg, "google_cloudfunctions2_function").values()
    return block(function, "service_config")["environment_variables"]


def test_every_schedule_the_function_knows_has_one_job_and_its_ticks_arrive(cfg: dict[str, Any]) -> None:
    jobs = resources(cfg, "google_cloud_scheduler_job")
    attributes = sorted(block(job, "pubsub_target")["attributes"][SCHEDULE_ATTRIBUTE] for job in jobs.values())
    assert attributes == sorted(SCHEDULES) == ["monitoring", "scoring"]
    assert check_ticks_reach_the_function(cfg) == []
    job = jobs["scoring"]
    assert block(job, "pubsub_target")["attributes"] == {SCHEDULE_ATTRIBUTE: "scoring"}
    assert job["schedule"] == "${local.scoring_schedule}" and job["time_zone"] == "Etc/UTC"
    assert job["paused"] == "${var.scoring_paused}"
    # Another job publishing the same attribute would launch every scoring run twice; a wrong topic none.
    broken = copy.deepcopy(cfg)
    block(resources(broken, "google_cloud_scheduler_job")["scoring"], "pubsub_target")["topic_name"] = \
        "${google_pubsub_topic.dead_letter.id}"
    assert any(p.startswith("scoring: scheduler topic") for p in check_ticks_reach_the_function(broken))


def test_schedule_and_prefix_default_to_the_settings_file(cfg: dict[str, Any]) -> None:
    settings = yaml.safe_load((ROOT / "ctloop.yaml").read_text())["scoring"]
    schedule, prefix = cfg["locals"]["scoring_schedule"], cfg["locals"]["scoring_prefix"]
    assert "var.scoring_schedule" in schedule and "../ctloop.yaml" in schedule and ".scoring.schedule" in schedule
    assert "var.scoring_landing_prefix" in prefix and ".scoring.landing_prefix" in prefix and '"-"' in prefix
    assert len(settings["schedule"].split()) == 5 and settings["landing_prefix"] == "scoring/"


def test_score_prefix_notification_and_function_settings(cfg: dict[str, Any]) -> None:
    from pipelines.scoring import PIPELINE_NAME

    notification = resources(cfg, "google_storage_notification")["scoring"]
    assert notification["object_name_prefix"] == "${local.scoring_prefix}"
    assert notification["count"] == '${local.scoring_prefix != "" ? 1 : 0}'  # off: no notification at all
    assert referenced(notification["bucket"], "google_storage_bucket") == {"landing"}
    assert cfg["locals"]["scoring_pipeline_name"] == PIPELINE_NAME
    assert "local.scoring_pipeline_name" in cfg["locals"]["scoring_template_uri"]
    env = _function_env(cfg)
    assert re.search(r"CTLOOP_TRIGGER_SCORE_TEMPLATE\s*=\s*local\.scoring_template_uri", env)
    assert re.search(r"CTLOOP_TRIGGER_SCORE_PREFIX\s*=\s*local\.scoring_prefix", env)


def test_the_deployed_prefixes_make_valid_function_settings(cfg: dict[str, Any]) -> None:
    """The function accepts what Terraform gives it: the score prefix from ctloop.yaml lies outside the training
    prefix (the variables' defaults), so a deploy does not fail on its first event."""
    variables = {name: body.get("default") for name, body in cfg["variable"].items()}
    training = f"{variables['bq_dataset']}/{variables['bq_table']}/"
    assert cfg["locals"]["landing_prefix"] == "${var.bq_dataset}/${var.bq_table}/"
    score_prefix = yaml.safe_load((ROOT / "ctloop.yaml").read_text())["scoring"]["landing_prefix"]
    settings = load_settings({"CTLOOP_TRIGGER_BUCKET": "ctloop-dev-landing", "CTLOOP_TRIGGER_PREFIX": training,
                              "CTLOOP_TRIGGER_TEMPLATE": "https://t", "CTLOOP_TRIGGER_SCORE_TEMPLATE": "https://s",
                              "CTLOOP_TRIGGER_SCORE_PREFIX": score_prefix})
    assert (settings.prefix, settings.score_prefix) == ("ctloop/events/", "scoring/")


def test_the_scoring_batch_can_pull_its_image(cfg: dict[str, Any]) -> None:
    pulls = [b for b in resources(cfg, "google_artifact_registry_repository_iam_member").values()
             if referenced(b.get("repository"), "google_artifact_registry_repository") == {"docker"}
             and referenced(b.get("member"), "google_service_account") == {"pipeline"}]
    assert [b["role"] for b in pulls] == ["roles/artifactregistry.reader"]
