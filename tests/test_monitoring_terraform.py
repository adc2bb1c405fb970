"""terraform/monitoring.tf wired to the code that consumes it: the scheduler's ticks reach the trigger function
with the attribute it reads, on the cron the settings file names, and the function knows the monitoring template.
(fmt and checkov cover the file through tests/test_terraform.py.)"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_terraform import block, load_config, referenced, resources
from tests.trigger_helpers import bundle_on_sys_path

bundle_on_sys_path()

from ctloop_trigger.schedule import SCHEDULE_ATTRIBUTE, SCHEDULES  # noqa: E402
from ctloop_trigger.settings import POLICIES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg() -> dict[str, Any]:
    return load_config()


def check_ticks_reach_the_function(cfg: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    jobs = resources(cfg, "google_cloud_scheduler_job")
    if not jobs:
        return ["expected a google_cloud_scheduler_job, found none"]
    for name, job in sorted(jobs.items()):
        problems += [f"{name}: {p}" for p in check_job_ticks(cfg, job)]
    return problems


def check_job_ticks(cfg: dict[str, Any], job: dict[str, Any]) -> list[str]:
    """One scheduler job's ticks reach the function, with the attribute naming a schedule it knows."""
    problems: list[str] = []
    target = block(job, "pubsub_target")
    topics = referenced(target.get("topic_name"), "google_pubsub_topic")
    (function,) = resources(cfg, "google_cloudfunctions2_function").values()
    fn_topics: set[str] = set()
    for dyn in function.get("dynamic", []):
        if "event_trigger" in dyn:
            fn_topics |= referenced(block(dyn["event_trigger"], "content").get("pubsub_topic"), "google_pubsub_topic")
    push_topics = {t for body in resources(cfg, "google_pubsub_subscription").values() if block(body, "push_config")
                   for t in referenced(body.get("topic"), "google_pubsub_topic")}
    if not topics or topics != fn_topics or topics != push_topics:
        problems.append(f"scheduler topic {topics} is not the function's topic (eventarc {fn_topics}, push "
                        f"{push_topics})")
    attributes = target.get("attributes") or {}
    if attributes.get(SCHEDULE_ATTRIBUTE) not in SCHEDULES:
        problems.append(f"scheduler attributes {attributes}: expected {SCHEDULE_ATTRIBUTE} in {list(SCHEDULES)}")
    agent_is_scheduler = "@gcp-sa-cloudscheduler.iam" in str(cfg["locals"].get("scheduler_agent", ""))
    publishers = [b for b in resources(cfg, "google_pubsub_topic_iam_member").values()
                  if b.get("role") == "roles/pubsub.publisher" and "local.scheduler_agent" in b.get("member", "")
                  and referenced(b.get("topic"), "google_pubsub_topic") == topics]
    if not (agent_is_scheduler and publishers):
        problems.append(f"no roles/pubsub.publisher for the Cloud Scheduler agent on {topics}")
    return problems


def test_scheduler_ticks_reach_the_trigger_function(cfg: dict[str, Any]) -> None:
    assert check_ticks_reach_the_function(cfg) == []


def test_tick_check_catches_a_wrong_attribute_and_topic(cfg: dict[str, Any]) -> None:
    broken = copy.deepcopy(cfg)
    job = resources(broken, "google_cloud_scheduler_job")["monitoring"]
    target = block(job, "pubsub_target")
    target["attributes"] = {"schedule": "monitoring"}
    target["topic_name"] = "${google_pubsub_topic.dead_letter.id}"
    problems = check_ticks_reach_the_function(broken)
    assert len(problems) == 3, problems


def test_schedule_defaults_to_the_settings_file_cron(cfg: dict[str, Any]) -> None:
    expr = cfg["locals"]["monitoring_schedule"]
    assert "var.monitoring_schedule" in expr and "../ctloop.yaml" in expr and "monitoring.schedule" in expr
    cron = yaml.safe_load((ROOT / "ctloop.yaml").read_text())["monitoring"]["schedule"]
    assert len(cron.split()) == 5
    job = resources(cfg, "google_cloud_scheduler_job")["monitoring"]
    assert job["schedule"] == "${local.monitoring_schedule}" and job["time_zone"] == "Etc/UTC"


def test_function_knows_the_monitoring_template_and_follows_the_settings_policy(cfg: dict[str, Any]) -> None:
    from pipelines.monitoring import PIPELINE_NAME

    assert cfg["locals"]["monitoring_pipeline_name"] == PIPELINE_NAME
    assert "local.monitoring_pipeline_name" in cfg["locals"]["monitoring_template_uri"]
    (function,) = resources(cfg, "google_cloudfunctions2_function").values()
    env = block(function, "service_config")["environment_variables"]
    assert re.search(r"CTLOOP_TRIGGER_MONITOR_TEMPLATE\s*=\s*local\.monitoring_template_uri", env)
    policy = re.search(r'CTLOOP_TRIGGER_POLICY\s*=\s*"(\w+)"', env).group(1)
    assert policy == "config" and policy in POLICIES
