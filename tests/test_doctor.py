"""``ctloop doctor --target vertex`` with the real Google clients (google-auth's impersonation and authorized
session, google-cloud-storage, kfp's RegistryClient) against the recording server playing a project."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.oauth2.credentials import Credentials

from ctloop.config import load_settings
from pipelines.doctor import Endpoints, account_email, required_services, run_doctor
from pipelines.iam_table import load_table
from tests.recording_server import RecordedRequest, RecordingServer

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "ctloop-dev"
# The person running the doctor: a static access token (google-auth refreshes nothing for it).
OPERATOR = Credentials(token="operator-token")


@pytest.fixture()
def settings():
    return load_settings(ROOT / "ctloop.yaml", [])


def needs_by_email(settings) -> dict[str, dict[str, set[str]]]:
    out: dict[str, dict[str, set[str]]] = {}
    for ident in load_table().values():
        if ident.account and ident.account.startswith("google_service_account."):
            for call in ident.calls:
                if not call.when:
                    out.setdefault(account_email(settings, ident.account), {}).setdefault(call.scope, set()).update(
                        call.permissions)
    return out


class FakeProject:
    """A project as the APIs answer it: enabled services, buckets, repositories, tags, and per-account grants
    (testIamPermissions answers with the asked permissions the calling account holds)."""

    def __init__(self, server: RecordingServer, settings, granted: dict[str, set[str]]) -> None:
        self.granted = granted  # email -> permissions, on every resource
        self.disabled: set[str] = set()
        self.buckets = {settings.gcp.landing_bucket, settings.gcp.staging_bucket, "ctloop-dev-pipeline-root"}
        server.route("GET", rf"/v1/projects/{PROJECT}/services:batchGet", self.services)
        server.route("GET", r"/storage/v1/b/([^/]+)", self.bucket)
        server.route("GET", rf"/v1/projects/{PROJECT}/locations/europe-west4/repositories/(ctloop|ctloop-pipelines)",
                     {"name": "repo"})
        server.route("GET", r"/kfp/packages/ctloop-training/tags/latest",
                     {"name": "projects/p/locations/l/repositories/r/packages/ctloop-training/tags/latest",
                      "version": "sha256:feed"})
        server.route("POST", r"/v1/projects/-/serviceAccounts/([^/]+):generateAccessToken", self.token)
        for pattern in (rf"/v3/projects/{PROJECT}:testIamPermissions",
                        rf"/v1/projects/{PROJECT}/serviceAccounts/[^/]+:testIamPermissions",
                        rf"/v1/projects/{PROJECT}/locations/europe-west4/repositories/[^/]+:testIamPermissions"):
            server.route("POST", pattern, self.test_permissions)
        server.route("GET", r"/storage/v1/b/[^/]+/iam/testPermissions", self.test_permissions)
        server.route("GET", r"/storage/v1/b/[^/]+/o/.+", self.read_object)

    def services(self, req: RecordedRequest) -> tuple[int, dict]:
        names = req.query["names"]
        return 200, {"services": [{"name": n, "config": {"name": n.rsplit("/", 1)[-1]},
                                   "state": "DISABLED" if n.rsplit("/", 1)[-1] in self.disabled else "ENABLED"}
                                  for n in names]}

    def bucket(self, req: RecordedRequest) -> tuple[int, dict]:
        name = req.path.rsplit("/", 1)[-1]
        return (200, {"name": name}) if name in self.buckets else (404, {"error": {"code": 404, "message": "no"}})

    def token(self, req: RecordedRequest) -> tuple[int, dict]:
        email = re.search(r"serviceAccounts/([^/:]+):", req.path).group(1)
        return 200, {"accessToken": f"token-for-{email}", "expireTime": "2099-01-01T00:00:00Z"}

    def read_object(self, req: RecordedRequest) -> tuple[int, dict]:
        """No object exists: a reader gets 404, anyone else 403 (as Cloud Storage answers)."""
        email = req.headers["authorization"].removeprefix("Bearer token-for-")
        if "storage.objects.get" in self.granted.get(email, set()):
            return 404, {"error": {"code": 404, "message": "No such object"}}
        return 403, {"error": {"code": 403, "message": f"{email} does not have storage.objects.get access"}}

    def test_permissions(self, req: RecordedRequest) -> tuple[int, dict]:
        email = req.headers["authorization"].removeprefix("Bearer token-for-")
        asked = req.query.get("permissions") or (req.json or {}).get("permissions", [])
        return 200, {"permissions": [p for p in asked if p in self.granted.get(email, set())]}


def _doctor(server: RecordingServer, settings):
    endpoints = Endpoints.local(server.url)
    endpoints = Endpoints(**{**endpoints.__dict__, "kfp_host": f"{server.url}/kfp"})
    template = f"https://europe-west4-kfp.pkg.dev/{PROJECT}/ctloop-pipelines/ctloop-training/latest"
    return run_doctor(settings, template=template, credentials=OPERATOR, endpoints=endpoints)


@pytest.fixture()
def project(recording_server: RecordingServer, settings) -> FakeProject:
    granted = {email: {p for perms in scopes.values() for p in perms}
               for email, scopes in needs_by_email(settings).items()}
    return FakeProject(recording_server, settings, granted)


def test_a_ready_project_passes(recording_server: RecordingServer, settings, project: FakeProject) -> None:
    report = _doctor(recording_server, settings)
    assert report.failures == []
    # Every API Terraform enables was asked for, in one request, as the operator.
    (apis,) = recording_server.find("GET", rf"/v1/projects/{PROJECT}/services:batchGet")
    assert apis.headers["authorization"] == "Bearer operator-token"
    assert {n.rsplit("/", 1)[-1] for n in apis.query["names"]} == set(required_services())
    assert "compute.googleapis.com" in required_services() and "dataproc.googleapis.com" in required_services()
    # Each service account was impersonated and its permissions tested as itself, on the project.
    tokens = {r.path for r in recording_server.find("POST", r".*:generateAccessToken")}
    assert f"/v1/projects/-/serviceAccounts/ctloop-pipeline@{PROJECT}.iam.gserviceaccount.com:generateAccessToken" \
        in tokens
    (pipeline_project,) = [r for r in recording_server.find("POST", rf"/v3/projects/{PROJECT}:testIamPermissions")
                           if r.headers["authorization"] == f"Bearer token-for-ctloop-pipeline@{PROJECT}.iam."
                                                            "gserviceaccount.com"]
    assert {"dataproc.batches.create", "dataproc.batches.get", "aiplatform.models.upload"} <= set(
        pipeline_project.json["permissions"])
    # actAs is tested on the account acted as; bucket permissions on the bucket.
    acts_as = rf"/v1/projects/{PROJECT}/serviceAccounts/ctloop-pipeline@.*:testIamPermissions"
    assert recording_server.find("POST", acts_as)
    assert recording_server.find("GET", r"/storage/v1/b/ctloop-dev-landing/iam/testPermissions")
    assert report.passed > 20
    # The serving SA's read grant under models/ is probed as that account (a missing object: 404 = may read).
    serving = f"ctloop-serving@{PROJECT}.iam.gserviceaccount.com"
    (probe,) = recording_server.find("GET", r"/storage/v1/b/ctloop-dev-staging/o/models/.*")
    assert probe.headers["authorization"] == f"Bearer token-for-{serving}"
    # What it cannot test is said, not skipped silently.
    assert f"{serving}: storage.objects.create on bucket:staging/prediction_log/ (only when monitoring.sample_rate" \
        " > 0)" in report.unverified
    assert any(line.startswith("gcs_agent (data.google_storage_project_service_account.gcs): a Google service "
                               "agent") for line in report.unverified)
    assert any("on dataset:ctloop" in line for line in report.unverified)


def test_a_prefix_read_grant_that_is_missing_fails(recording_server: RecordingServer, settings,
                                                  project: FakeProject) -> None:
    serving = f"ctloop-serving@{PROJECT}.iam.gserviceaccount.com"
    project.granted[serving] = {"aiplatform.featureViews.fetchFeatureValues"}  # everything but the models/ read
    assert _doctor(recording_server, settings).failures == [
        f"{serving} lacks storage.objects.get on bucket:staging/models/ -> terraform apply (terraform/iam.tf "
        "grants it; docs/iam.md says which role)"]


def test_each_problem_is_one_line_with_its_fix(recording_server: RecordingServer, settings,
                                               project: FakeProject) -> None:
    pipeline = f"ctloop-pipeline@{PROJECT}.iam.gserviceaccount.com"
    project.granted[pipeline] -= {"dataproc.batches.create", "dataproc.batches.get"}
    project.disabled.add("compute.googleapis.com")
    project.buckets.discard(settings.gcp.staging_bucket)
    report = _doctor(recording_server, settings)
    assert report.failures == [
        f"API compute.googleapis.com is not enabled in {PROJECT} -> terraform apply (terraform/apis.tf), or gcloud "
        f"services enable compute.googleapis.com --project {PROJECT}",
        f"bucket gs://{settings.gcp.staging_bucket} (gcp.staging) does not exist -> terraform apply "
        "(terraform/storage.tf), or fix the bucket name in the settings",
        f"{pipeline} lacks dataproc.batches.create, dataproc.batches.get on project -> terraform apply "
        "(terraform/iam.tf grants it; docs/iam.md says which role)",
    ]


def test_missing_template_and_repository(recording_server: RecordingServer, settings, project: FakeProject) -> None:
    recording_server.route("GET", r"/kfp/packages/ctloop-training/tags/latest", (404, {"error": "not found"}))
    recording_server.route("GET", rf"/v1/projects/{PROJECT}/locations/europe-west4/repositories/ctloop",
                           (404, {"error": {"code": 404}}))
    failures = _doctor(recording_server, settings).failures
    assert len(failures) == 2
    assert failures[0].startswith("Artifact Registry repository ctloop in europe-west4 is missing (HTTP 404) -> "
                                  "terraform apply")
    assert failures[1].startswith(f"template https://europe-west4-kfp.pkg.dev/{PROJECT}/ctloop-pipelines/"
                                  "ctloop-training/latest is not reachable (")
    assert failures[1].endswith("-> run the release build once (cloudbuild.yaml uploads the template and tags it)")


def test_cli_exits_non_zero_with_one_line_per_problem(recording_server: RecordingServer, settings,
                                                      project: FakeProject, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.doctor as doctor
    from pipelines.cli import cli

    real = doctor.run_doctor
    monkeypatch.setattr(doctor, "run_doctor", lambda s, template=None: real(
        s, template=template, credentials=OPERATOR,
        endpoints=Endpoints(**{**Endpoints.local(recording_server.url).__dict__,
                               "kfp_host": f"{recording_server.url}/kfp"})))
    project.disabled.add("dataproc.googleapis.com")
    result = CliRunner().invoke(cli, ["--config", str(ROOT / "ctloop.yaml"), "doctor", "--target", "vertex",
                                      "--template", f"https://europe-west4-kfp.pkg.dev/{PROJECT}/ctloop-pipelines/"
                                                    "ctloop-training/latest"])
    assert result.exit_code == 1
    assert "API dataproc.googleapis.com is not enabled" in result.output
    assert result.output.strip().splitlines()[-1].endswith("1 failed")
    assert "not checked: " in result.output
    assert "Traceback" not in result.output


def test_no_credentials_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.cli import cli

    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    result = CliRunner().invoke(cli, ["--config", str(ROOT / "ctloop.yaml"), "doctor"])
    assert result.exit_code == 1
    assert "doctor: no Google credentials" in result.output
    assert "gcloud auth application-default login" in result.output
    assert "Traceback" not in result.output
