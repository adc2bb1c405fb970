"""``ctloop doctor --target vertex``: check a real project before the first cloud run.

Checks, each failure one line naming the problem and its fix:
- the APIs Terraform enables (terraform/apis.tf, monitoring.tf) are enabled (Service Usage ``batchGet``);
- the buckets and Artifact Registry repositories the settings name exist;
- the pipeline template is reachable (its Artifact Registry tag resolves);
- every service account of the IAM table (terraform/iam/calls.yaml) holds the permissions its calls need, tested
  as that account (impersonated) with ``testIamPermissions`` on the project, the buckets, the repositories and
  the service accounts it acts as; an object-prefix read grant by reading a missing object under the prefix
  (404 = allowed, 403 = denied).

Not verified here, and listed as such in the report (the Terraform tests check them against the bindings):
object-prefix writes (testing them would write), optional calls (``when``), grants on datasets, topics,
subscriptions and Cloud Run services, and Google's service agents (they cannot be impersonated).

The caller needs serviceusage.services.get, storage.buckets.get, artifactregistry.repositories.get and
Service Account Token Creator on the accounts (docs/iam.md, identity ``operator``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ctloop.config import Settings
from ctloop.errors import CtloopError
from pipelines.iam_table import ROOT, Identity, load_table

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
_SERVICE = re.compile(r'"([a-z0-9-]+\.googleapis\.com)"')
_IMAGE_REPO = re.compile(r"^(?P<location>[a-z0-9-]+)-docker\.pkg\.dev/(?P<project>[^/]+)/(?P<repo>[^/]+)/")
_TEMPLATE = re.compile(r"^https://(?P<location>[a-z0-9-]+)-kfp\.pkg\.dev/(?P<project>[^/]+)/(?P<repo>[^/]+)/"
                       r"(?P<package>[^/]+)/(?P<tag>[^/]+)$")


@dataclass(frozen=True)
class Endpoints:
    """API roots; all of them point at one local server in tests."""

    serviceusage: str = "https://serviceusage.googleapis.com"
    resourcemanager: str = "https://cloudresourcemanager.googleapis.com"
    iam: str = "https://iam.googleapis.com"
    iamcredentials: str = "https://iamcredentials.googleapis.com"
    artifactregistry: str = "https://artifactregistry.googleapis.com"
    storage: str = "https://storage.googleapis.com"
    kfp_host: str = ""  # overrides the template's https://<region>-kfp.pkg.dev/<project>/<repo> host

    @classmethod
    def local(cls, url: str) -> Endpoints:
        return cls(url, url, url, url, url, url, "")


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)
    passed: int = 0
    unverified: list[str] = field(default_factory=list)  # what the doctor cannot test, one line each

    def check(self, ok: bool, problem: str, fix: str) -> None:
        if ok:
            self.passed += 1
        else:
            self.failures.append(f"{problem} -> {fix}")


def required_services() -> list[str]:
    """The APIs Terraform enables: every *.googleapis.com literal of the google_project_service blocks' files."""
    found: list[str] = []
    for path in sorted((ROOT / "terraform").glob("*.tf")):
        text = path.read_text()
        if "google_project_service" in text:
            found += [s for s in _SERVICE.findall(text) if s not in found]
    return sorted(found)


def account_email(settings: Settings, account: str) -> str:
    """``google_service_account.function_build`` -> ``<prefix>-function-build@<project>.iam.gserviceaccount.com``,
    the naming of terraform/iam.tf, with the prefix of the settings' pipeline account."""
    if account == "google_service_account.serving" and settings.gcp.serving_service_account:
        return settings.gcp.serving_service_account
    name = account.split(".")[1].replace("_", "-")
    local = settings.gcp.service_account.split("@", 1)[0]
    prefix = local[: -len("-pipeline")] if local.endswith("-pipeline") else "ctloop"
    return f"{prefix}-{name}@{settings.gcp.project}.iam.gserviceaccount.com"


def default_template(settings: Settings) -> str:
    """The training template's ``latest`` tag in the repository Terraform creates next to the image one."""
    match = _IMAGE_REPO.match(settings.gcp.component_image)
    repo = match.group("repo") if match else "ctloop"
    return f"https://{settings.gcp.region}-kfp.pkg.dev/{settings.gcp.project}/{repo}-pipelines/ctloop-training/latest"


def run_doctor(settings: Settings, *, template: str | None = None, credentials: Any = None,
               endpoints: Endpoints = Endpoints(), impersonate: Callable[[str], Any] | None = None,
               table: dict[str, Identity] | None = None) -> Report:
    """Run every check against ``settings.gcp.project``; the report lists one line per failure."""
    import google.auth
    import requests
    from google.auth.exceptions import GoogleAuthError
    from google.auth.transport.requests import AuthorizedSession

    if credentials is None:
        try:
            credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM])
        except GoogleAuthError as exc:
            raise CtloopError(f"doctor: no Google credentials ({str(exc).splitlines()[0]}); run "
                              "`gcloud auth application-default login`") from None
    project = settings.gcp.project
    session = AuthorizedSession(credentials)
    report = Report()
    template = template or default_template(settings)

    # APIs
    services = required_services()
    try:
        answer = session.get(f"{endpoints.serviceusage}/v1/projects/{project}/services:batchGet",
                             params={"names": [f"projects/{project}/services/{s}" for s in services]})
    except (requests.RequestException, GoogleAuthError) as exc:
        raise CtloopError(f"doctor: cannot reach {endpoints.serviceusage} as the caller "
                          f"({str(exc).splitlines()[0][:160]})") from None
    enabled = {s.get("config", {}).get("name", s.get("name", "").rsplit("/", 1)[-1])
               for s in (answer.json().get("services", []) if answer.ok else []) if s.get("state") == "ENABLED"}
    if not answer.ok:
        report.check(False, f"cannot read the enabled APIs of {project} (HTTP {answer.status_code})",
                     "enable serviceusage.googleapis.com and grant yourself roles/serviceusage.serviceUsageViewer")
    else:
        for service in services:
            report.check(service in enabled, f"API {service} is not enabled in {project}",
                         f"terraform apply (terraform/apis.tf), or gcloud services enable {service} "
                         f"--project {project}")

    # buckets
    from google.cloud import storage

    gcs = storage.Client(project=project, credentials=credentials, client_options={"api_endpoint": endpoints.storage})
    buckets = {"landing": settings.gcp.landing_bucket, "staging": settings.gcp.staging_bucket,
               "pipeline_root": settings.gcp.pipeline_root.removeprefix("gs://").split("/", 1)[0]}
    for key, name in buckets.items():
        report.check(gcs.lookup_bucket(name) is not None, f"bucket gs://{name} (gcp.{key}) does not exist",
                     "terraform apply (terraform/storage.tf), or fix the bucket name in the settings")

    # repositories and the template
    repos: dict[str, tuple[str, str]] = {}
    image = _IMAGE_REPO.match(settings.gcp.component_image)
    if image:
        repos["docker"] = (image.group("location"), image.group("repo"))
    tmpl = _TEMPLATE.match(template)
    if tmpl:
        repos["kfp"] = (tmpl.group("location"), tmpl.group("repo"))
    else:
        report.check(False, f"template {template!r} is not an Artifact Registry tag URI",
                     "pass --template https://REGION-kfp.pkg.dev/PROJECT/REPO/PACKAGE/TAG")
    for location, repo in repos.values():
        answer = session.get(f"{endpoints.artifactregistry}/v1/projects/{project}/locations/{location}/"
                             f"repositories/{repo}")
        report.check(answer.ok, f"Artifact Registry repository {repo} in {location} is missing "
                     f"(HTTP {answer.status_code})", "terraform apply (terraform/artifact_registry.tf)")
    if tmpl and "kfp" in repos:
        from kfp.registry import RegistryClient

        host = endpoints.kfp_host or f"https://{tmpl.group('location')}-kfp.pkg.dev/{project}/{tmpl.group('repo')}"
        try:
            RegistryClient(host=host).get_tag(tmpl.group("package"), tmpl.group("tag"))
            report.check(True, "", "")
        except Exception as exc:  # noqa: BLE001 - any failure to resolve the tag is this check's answer
            report.check(False, f"template {template} is not reachable ({str(exc).splitlines()[0][:120]})",
                         "run the release build once (cloudbuild.yaml uploads the template and tags it)")

    # identities: each service account's permissions, tested as that account
    table = table if table is not None else load_table()
    _check_identities(settings, table, report, endpoints, credentials, impersonate, buckets, repos)
    return report


def _check_identities(settings: Settings, table: dict[str, Identity], report: Report, endpoints: Endpoints,
                      credentials: Any, impersonate: Callable[[str], Any] | None, buckets: dict[str, str],
                      repos: dict[str, tuple[str, str]]) -> None:
    from google.auth.transport.requests import AuthorizedSession

    needs: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for ident in table.values():
        if not ident.account:
            continue  # the operator: the doctor's own calls are its checks
        if not ident.account.startswith("google_service_account."):
            report.unverified.append(f"{ident.name} ({ident.account}): a Google service agent, not impersonable")
            continue
        email = account_email(settings, ident.account)
        for call in ident.calls:
            if call.when:
                report.unverified.append(f"{email}: {', '.join(call.permissions)} on {call.scope} "
                                         f"(only when {call.when})")
            else:
                needs[email][call.scope].update(call.permissions)
    impersonate = impersonate or (lambda email: _impersonated(credentials, email, endpoints))
    project = settings.gcp.project
    for email, scopes in needs.items():
        as_identity = impersonate(email)
        session = AuthorizedSession(as_identity)
        for scope, perms in sorted(scopes.items()):
            kind, _, name = scope.partition(":")
            if kind == "project":
                url = f"{endpoints.resourcemanager}/v3/projects/{project}:testIamPermissions"
            elif kind == "bucket" and "/" not in name and name in buckets:
                url = f"{endpoints.storage}/storage/v1/b/{buckets[name]}/iam/testPermissions"
            elif kind == "bucket" and perms == {"storage.objects.get"} and name.split("/", 1)[0] in buckets:
                _probe_prefix_read(session, report, endpoints, email, scope, buckets)
                continue
            elif kind == "service_account":
                target = account_email(settings, f"google_service_account.{name}")
                url = f"{endpoints.iam}/v1/projects/{project}/serviceAccounts/{target}:testIamPermissions"
            elif kind == "repository" and name in repos:
                location, repo = repos[name]
                url = (f"{endpoints.artifactregistry}/v1/projects/{project}/locations/{location}/repositories/"
                       f"{repo}:testIamPermissions")
            else:
                report.unverified.append(f"{email}: {', '.join(sorted(perms))} on {scope}")
                continue
            wanted = sorted(perms)
            try:
                if kind == "bucket":
                    answer = session.get(url, params={"permissions": wanted})
                else:
                    answer = session.post(url, json={"permissions": wanted})
            except Exception as exc:  # noqa: BLE001 - impersonation refused: one line, not a traceback
                report.check(False, f"cannot test {email}'s permissions ({str(exc).splitlines()[0][:120]})",
                             f"grant yourself roles/iam.serviceAccountTokenCreator on {email}")
                break
            if not answer.ok:
                report.check(False, f"testIamPermissions as {email} on {scope} failed (HTTP {answer.status_code})",
                             f"check that {email} exists (terraform apply) and that you may impersonate it")
                continue
            granted = set(answer.json().get("permissions", []))
            missing = [p for p in wanted if p not in granted]
            report.check(not missing, f"{email} lacks {', '.join(missing)} on {scope}",
                         "terraform apply (terraform/iam.tf grants it; docs/iam.md says which role)")


def _probe_prefix_read(session: Any, report: Report, endpoints: Endpoints, email: str, scope: str,
                       buckets: dict[str, str]) -> None:
    """A prefix-conditioned read grant, which ``testPermissions`` on the bucket does not evaluate: read a missing
    object under the prefix as ``email``. Storage answers 404 to a reader, 403 to anyone else."""
    from urllib.parse import quote

    key, _, prefix = scope.partition(":")[2].partition("/")
    url = f"{endpoints.storage}/storage/v1/b/{buckets[key]}/o/{quote(prefix + '.ctloop-doctor-probe', safe='')}"
    try:
        status = session.get(url).status_code
    except Exception as exc:  # noqa: BLE001 - impersonation refused: one line, not a traceback
        report.check(False, f"cannot test {email}'s permissions ({str(exc).splitlines()[0][:120]})",
                     f"grant yourself roles/iam.serviceAccountTokenCreator on {email}")
        return
    if status in (403, 404):
        report.check(status == 404, f"{email} lacks storage.objects.get on {scope}",
                     "terraform apply (terraform/iam.tf grants it; docs/iam.md says which role)")
    else:
        report.check(False, f"reading gs://{buckets[key]}/{prefix} as {email} failed (HTTP {status})",
                     f"check that {email} exists (terraform apply) and that you may impersonate it")


def _impersonated(source: Any, email: str, endpoints: Endpoints) -> Any:
    from google.auth import impersonated_credentials

    return impersonated_credentials.Credentials(
        source_credentials=source, target_principal=email, target_scopes=[CLOUD_PLATFORM],
        iam_endpoint_override=f"{endpoints.iamcredentials}/v1/projects/-/serviceAccounts/{email}:generateAccessToken",
    )
