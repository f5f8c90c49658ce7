"""deploy/k8s/: every manifest valid for a pinned Kubernetes (strict: an unknown or misspelt field fails, which
kubectl would drop silently), and the promises the README makes about them kept: a GPU and a grace period above
the longest job for workers, non-root containers, the database URL from a Secret, the migration Job.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import yaml

from tests.common import require_tool

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"  # the oldest release still supported upstream when this was written
WORKER_GRACE_S = 1800  # above the longest job: SIGTERM lets a worker finish its job (40-worker.yaml)


def _validator():
    require_tool("ok" if importlib.util.find_spec("kubernetes_validate") else None, "kubernetes-validate (pip)")
    import kubernetes_validate

    return kubernetes_validate


def _files(folder: Path | None = None) -> list[Path]:
    folder = folder or K8S
    return sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))


def _docs(folder: Path | None = None) -> list[dict]:
    return [d for f in _files(folder) for d in yaml.safe_load_all(f.read_text()) if d]


def _validate_folder(folder: Path) -> list[str]:
    """Every document of every manifest, against the pinned version, strictly: the failures, as text."""
    kv = _validator()
    failures = []
    for f in _files(folder):
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc:
                continue
            try:
                kv.validate(doc, KUBERNETES_VERSION, strict=True)
            except (kv.ValidationError, kv.SchemaNotFoundError, kv.InvalidSchemaError) as err:
                failures.append(f"{f.name} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {err}")
    return failures


def _by_kind(kind: str) -> list[dict]:
    return [d for d in _docs() if d["kind"] == kind]


def _deployment(component: str) -> dict:
    [d] = [d for d in _by_kind("Deployment")
           if d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    return d


def _pod_specs() -> list[tuple[str, dict]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
            for d in _docs() if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")]


def test_the_folder_has_every_part():
    kinds = {(d["kind"], d["metadata"]["name"]) for d in _docs()}
    for expected in [("Deployment", "ctseg-api"), ("Service", "ctseg-api"), ("Deployment", "ctseg-dicom"),
                     ("Service", "ctseg-dicom"), ("Deployment", "ctseg-worker"), ("Job", "ctseg-migrate"),
                     ("PodDisruptionBudget", "ctseg-api"), ("PodDisruptionBudget", "ctseg-worker"),
                     ("PersistentVolumeClaim", "ctseg-shared"), ("Secret", "ctseg-database")]:
        assert expected in kinds, f"deploy/k8s/ lacks {expected}"
    assert all("namespace" not in d["metadata"] for d in _docs()), "manifests stay namespace-agnostic (kubectl -n)"


def test_every_manifest_is_valid_for_the_pinned_kubernetes():
    assert _files(), "no manifest in deploy/k8s/"
    assert _validate_folder(K8S) == []


def test_a_broken_manifest_fails_validation(tmp_path):
    """The check above can fail: a misspelt field (strict) and a wrong type are both caught."""
    api = (K8S / "20-api.yaml").read_text()
    (tmp_path / "misspelt.yaml").write_text(api.replace("readinessProbe:", "readynessProbe:", 1))
    (tmp_path / "wrong-type.yaml").write_text(api.replace("replicas: 2", "replicas: two", 1))
    failures = _validate_folder(tmp_path)
    assert any(f.startswith("misspelt.yaml Deployment/ctseg-api") for f in failures), failures
    assert any(f.startswith("wrong-type.yaml Deployment/ctseg-api") for f in failures), failures


def test_workers_ask_for_a_gpu_and_outlive_their_longest_job():
    spec = _deployment("worker")["spec"]["template"]["spec"]
    [worker] = spec["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["terminationGracePeriodSeconds"] >= WORKER_GRACE_S
    env = {e["name"]: e.get("value") for e in worker.get("env", [])}
    assert env["CTSEG_ROLE"] == "worker" and env["CTSEG_DEVICE"] == "cuda"
    assert "ports" not in worker, "a worker serves no port"


def test_api_probes_name_routes_the_app_serves():
    from server.api.routes import health

    paths = {r.path for r in health.router.routes}
    for component in ("api", "dicom"):
        [c] = _deployment(component)["spec"]["template"]["spec"]["containers"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" in paths
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" in paths
    assert _deployment("api")["spec"]["replicas"] == 2
    assert _deployment("dicom")["spec"]["replicas"] == 1
    [svc] = [d for d in _by_kind("Service") if d["metadata"]["name"] == "ctseg-dicom"]
    assert svc["spec"]["type"] == "LoadBalancer"


def test_every_container_runs_as_non_root():
    for name, spec in _pod_specs():
        pod = spec.get("securityContext", {})
        for c in spec["containers"] + spec.get("initContainers", []):
            ctx = {**pod, **c.get("securityContext", {})}
            assert ctx.get("runAsNonRoot") is True, f"{name} {c['name']} may run as root"
            assert ctx.get("runAsUser", 1) != 0, f"{name} {c['name']} runs as uid 0"
            assert c["securityContext"].get("allowPrivilegeEscalation") is False, f"{name} {c['name']}"
            assert c["securityContext"].get("readOnlyRootFilesystem") is True, f"{name} {c['name']}"


def test_the_database_url_comes_from_a_secret():
    secrets = {d["metadata"]["name"]: d for d in _by_kind("Secret")}
    for name, spec in _pod_specs():
        for c in spec["containers"]:
            [url] = [e for e in c.get("env", []) if e["name"] == "CTSEG_DATABASE_URL"]
            assert "value" not in url, f"{name}: the database URL (with its password) in plain text"
            ref = url["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets[ref["name"]]["stringData"], f"{name}: no such Secret key {ref}"
    for cm in _by_kind("ConfigMap"):
        assert "CTSEG_DATABASE_URL" not in cm.get("data", {}), "the database URL belongs in the Secret"


def test_the_migration_job_runs_ctseg_db_upgrade():
    [job] = _by_kind("Job")
    [c] = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] + c.get("args", []) == ["ctseg", "db", "upgrade"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")


def test_every_role_mounts_the_shared_volume_at_the_storage_folder():
    [pvc] = _by_kind("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, spec in _pod_specs():
        claims = {v["name"] for v in spec["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]}
        for c in spec["containers"]:
            mounts = {m["mountPath"] for m in c["volumeMounts"] if m["name"] in claims}
            assert mounts == {"/var/lib/ctseg"}, f"{name} {c['name']} does not mount the shared storage"


def test_kubernetes_validate_cli_agrees():
    """The command operators run by hand (README here) says the same as the library."""
    import subprocess

    cli = require_tool(shutil.which("kubernetes-validate")
                       or (str(p) if (p := Path(__file__).parent.parent / ".venv/bin/kubernetes-validate").exists()
                           else None), "kubernetes-validate")
    run = subprocess.run([cli, "--strict", "-k", KUBERNETES_VERSION, *map(str, _files())],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
