"""Offline checks of the Kubernetes manifests in k8s/.

Every kustomization is rendered with `kubectl kustomize` from a temporary copy of
the files git tracks under k8s/, as a fresh clone has them (credentials are made
in the cluster by the refine-af-secrets Job, whose script is run here against a
fake API). The rendered objects are validated against the Kubernetes JSON
schemas (kubernetes-validate) and checked against the deployment policy:
resources, non-root and hardened containers, pinned images, probes, no
plaintext credentials, NetworkPolicies, least-privilege RBAC.

The remote kustomizations under k8s/kfp/ (Kubeflow Pipelines from GitHub) are
not rendered offline; they are checked for a pinned release tag and their
patches against k8s/base instead.

`python tests/test_k8s.py` prints the rendered object count per kustomization.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
KUBECTL = shutil.which("kubectl")

# The oldest Kubernetes minor the manifests must be valid for (kind and current
# managed clusters run 1.33 or newer); kubernetes-validate 1.37.0 ships 1.33-1.37.
K8S_SCHEMA_VERSION = "1.33"

NAMESPACE = "refine-af"
KFP_NAMESPACE = "kubeflow"
STATEFUL_SERVICES = ("minio", "postgres", "mlflow")
# The Secrets the refine-af-secrets Job creates: (namespace, name) -> keys.
JOB_SECRETS = {
    (NAMESPACE, "minio-root"): {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"},
    (NAMESPACE, "postgres-credentials"): {"POSTGRES_USER", "POSTGRES_PASSWORD"},
    (NAMESPACE, "refine-af-s3"): {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    (KFP_NAMESPACE, "refine-af-s3"): {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
}
# Environment variable names that must never carry a literal value.
SENSITIVE_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
# user:password@ inside a URL.
URL_CREDENTIALS = re.compile(r"://(?P<user>[^/@:\s]+):(?P<password>[^/@\s]+)@")
ONLY_VAR_REFS = re.compile(r"^(\$\([A-Za-z_][A-Za-z0-9_]*\))+$")

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}
CLUSTER_SCOPED_KINDS = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
}


def _kustomization_dirs() -> list[str]:
    """Directories under k8s/ to render: every kustomization except the remote
    KFP ones and kustomize Components (which only build inside an overlay)."""
    dirs = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        rel = path.parent.relative_to(K8S)
        if rel.parts[:1] == ("kfp",):
            continue
        if yaml.safe_load(path.read_text()).get("kind") == "Component":
            continue
        dirs.append(str(rel))
    return dirs


KUSTOMIZATION_DIRS = _kustomization_dirs()
OVERLAYS = [d for d in KUSTOMIZATION_DIRS if d.startswith("overlays/")]


def _git_files() -> list[str]:
    proc = subprocess.run(
        ["git", "ls-files", "k8s"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return proc.stdout.split()


def _render_tree(workdir: Path) -> Path:
    """k8s/ as a fresh clone has it: only the files git tracks."""
    for rel in _git_files():
        target = workdir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, target)
    return workdir / "k8s"


def _kustomize(tree: Path, rel: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [KUBECTL, "kustomize", str(tree / rel)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize k8s/{rel} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed; `kubectl kustomize` renders k8s/")
    tree = _render_tree(tmp_path_factory.mktemp("render"))
    return {rel: _kustomize(tree, rel) for rel in KUSTOMIZATION_DIRS}


def _all_objects(rendered: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(rel, obj) for rel, objs in rendered.items() for obj in objs]


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    kind = obj["kind"]
    if kind == "Pod":
        return obj["spec"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind in WORKLOAD_KINDS:
        return obj["spec"]["template"]["spec"]
    return None


def _containers(rendered):
    """(where, pod spec, container) for every container and init container."""
    seen = set()
    for rel, obj in _all_objects(rendered):
        spec = _pod_spec(obj)
        if spec is None:
            continue
        for field in ("initContainers", "containers"):
            for container in spec.get(field, []):
                key = (obj["kind"], obj["metadata"]["name"], container["name"])
                if key in seen:
                    continue
                seen.add(key)
                yield (
                    f"{rel}: {obj['kind']}/{obj['metadata']['name']}/{container['name']}",
                    spec,
                    container,
                )


def _name(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('namespace', '-')}/{obj['metadata']['name']}"


# ---------------------------------------------------------------- rendering


def test_kustomizations_found() -> None:
    assert "." in KUSTOMIZATION_DIRS
    assert "base" in KUSTOMIZATION_DIRS
    assert {"overlays/kind", "overlays/minikube", "overlays/external-s3"} <= set(OVERLAYS)


@pytest.mark.parametrize("rel", KUSTOMIZATION_DIRS)
def test_kustomization_renders(rendered, rel: str) -> None:
    objs = rendered[rel]
    assert objs, f"k8s/{rel} rendered nothing"
    kinds = Counter(obj["kind"] for obj in objs)
    own_minio = rel != "overlays/external-s3"
    assert kinds["Deployment"] >= 1 + own_minio and kinds["StatefulSet"] == 1, kinds


def test_fresh_clone_applies_as_typed(rendered) -> None:
    """`kubectl apply -k k8s/` needs no file that git does not carry (issue 12, item 14)."""
    assert not [f for f in _git_files() if f.endswith(".env")]
    assert rendered["."], "k8s/ rendered nothing from the tracked files alone"


def test_objects_validate_against_kubernetes_schemas(rendered) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked: set[str] = set()
    failures = []
    for rel, obj in _all_objects(rendered):
        key = yaml.safe_dump(obj, sort_keys=True)
        if key in checked:
            continue
        checked.add(key)
        try:
            kubernetes_validate.validate(obj, K8S_SCHEMA_VERSION, strict=True)
        except Exception as exc:  # ValidationError, SchemaNotFoundError
            failures.append(f"{rel}: {_name(obj)}: {exc}")
    assert not failures, "\n".join(failures)


def test_every_object_names_its_namespace(rendered) -> None:
    for rel, obj in _all_objects(rendered):
        if obj["kind"] in CLUSTER_SCOPED_KINDS:
            continue
        assert obj["metadata"].get("namespace") in {NAMESPACE, KFP_NAMESPACE}, (
            f"{rel}: {_name(obj)}"
        )


def test_namespace_enforces_restricted_pod_security(rendered) -> None:
    namespaces = [o for o in rendered["base"] if o["kind"] == "Namespace"]
    assert [ns["metadata"]["name"] for ns in namespaces] == [NAMESPACE]
    labels = namespaces[0]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# ---------------------------------------------------------------- containers


def test_containers_have_requests_and_limits(rendered) -> None:
    for where, _spec, container in _containers(rendered):
        resources = container.get("resources", {})
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(section, {})), f"{where}: {section}"


def test_containers_run_as_non_root_and_hardened(rendered) -> None:
    for where, spec, container in _containers(rendered):
        pod_sc = spec.get("securityContext", {})
        sc = container.get("securityContext", {})
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        assert isinstance(uid, int) and uid > 0, f"{where}: runAsUser {uid}"
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not sc.get("capabilities", {}).get("add"), where
        assert not sc.get("privileged", False), where
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault", where
        # All of our programs run with a read-only root; scratch space is an emptyDir.
        assert sc.get("readOnlyRootFilesystem") is True, where
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{where}: no writable /tmp"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert "emptyDir" in volumes[mounts["/tmp"]], where
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), where


def test_pods_do_not_mount_api_tokens(rendered) -> None:
    """Our servers never call the Kubernetes API; only the Job that creates the Secrets."""
    for rel, obj in _all_objects(rendered):
        spec = _pod_spec(obj)
        if spec is not None:
            mounts = obj["metadata"]["name"] == "refine-af-secrets"
            assert spec.get("automountServiceAccountToken") is mounts, f"{rel}: {_name(obj)}"


IMAGE_REF = re.compile(
    r"^(?P<repo>[a-z0-9]+(?:[._\-/][a-z0-9]+)*(?::\d+)?(?:/[a-z0-9._\-]+)*)"
    r":(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127})(?:@sha256:[0-9a-f]{64})?$"
)


def test_images_are_pinned(rendered) -> None:
    for where, _spec, container in _containers(rendered):
        image = container["image"]
        match = IMAGE_REF.match(image)
        assert match, f"{where}: image {image!r} has no tag"
        assert match["tag"] != "latest", f"{where}: {image} uses :latest"
        assert container.get("imagePullPolicy", "IfNotPresent") != "Always", where


def test_servers_have_probes(rendered) -> None:
    servers = {}
    for where, _spec, container in _containers(rendered):
        servers.setdefault(container["name"], (where, container))
    for name in STATEFUL_SERVICES:
        assert name in servers, f"no container named {name}"
        where, container = servers[name]
        assert container.get("readinessProbe"), f"{where}: readinessProbe"
        assert container.get("livenessProbe"), f"{where}: livenessProbe"


def test_mlflow_health_probes_and_server_flags(rendered) -> None:
    [deploy] = [
        o
        for o in rendered["base"]
        if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow"
    ]
    [container] = deploy["spec"]["template"]["spec"]["containers"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    args = container["args"]
    assert "--serve-artifacts" in args
    assert "--artifacts-destination=s3://mlflow/" in args
    assert "--allowed-hosts=$(MLFLOW_SERVER_ALLOWED_HOSTS)" in args
    env = {e["name"]: e for e in container["env"]}
    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    for host in (
        "mlflow",
        "mlflow.refine-af",
        "mlflow.refine-af.svc",
        "mlflow.refine-af.svc.cluster.local",
    ):
        assert host in hosts and f"{host}:5000" in hosts, host
    assert "localhost:*" in hosts
    # --backend-store-uri comes from MLFLOW_BACKEND_STORE_URI, built from Secret values.
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith(
        "postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@postgres."
    )
    for name in (
        "POSTGRES_USER",
        "POSTGRES_PASSWORD",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio.refine-af.svc.cluster.local:9000"


def test_bucket_job_creates_the_buckets(rendered) -> None:
    [job] = [o for o in rendered["base"] if o["metadata"]["name"] == "minio-buckets"]
    script = "\n".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "mc mb --ignore-existing local/refine-af-artifacts local/mlflow" in script


# ---------------------------------------------------------------- credentials


def test_no_secret_manifests_are_committed() -> None:
    for path in K8S.rglob("*.y*ml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict):
                assert doc.get("kind") != "Secret", f"{path} defines a Secret"


def test_nothing_renders_a_secret(rendered) -> None:
    for rel, obj in _all_objects(rendered):
        assert obj["kind"] != "Secret", f"{rel}: {_name(obj)}"


def _secrets_job(objs: list[dict[str, Any]]) -> dict[str, Any]:
    [job] = [o for o in objs if o["kind"] == "Job" and o["metadata"]["name"] == "refine-af-secrets"]
    return job


def _referenced_secrets(objs: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """(namespace, Secret) -> keys, for every secretKeyRef and the kfp-launcher secretRef."""
    refs: dict[tuple[str, str], set[str]] = {}
    for obj in objs:
        spec = _pod_spec(obj)
        for container in (spec or {}).get("containers", []):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    key = (obj["metadata"]["namespace"], ref["name"])
                    refs.setdefault(key, set()).add(ref["key"])
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "kfp-launcher":
            ref = yaml.safe_load(obj["data"]["providers"])["s3"]["default"]["credentials"]
            key = (obj["metadata"]["namespace"], ref["secretRef"]["secretName"])
            refs.setdefault(key, set()).update(
                {ref["secretRef"]["accessKeyKey"], ref["secretRef"]["secretKeyKey"]}
            )
    return refs


def test_secrets_job_makes_every_secret_the_workloads_read(rendered) -> None:
    objs = rendered["base"]
    script = _secrets_job(objs)["spec"]["template"]["spec"]["containers"][0]["args"][0]
    made = {}
    for line in script.replace("\\\n", " ").splitlines():
        if line.startswith("create "):
            _, namespace, name, first, _, second, _ = shlex.split(line)
            made[(namespace, name)] = {first, second}
    assert made == JOB_SECRETS
    assert _referenced_secrets(objs) == JOB_SECRETS


def _fake_api(bin_dir: Path, store: Path, get_code: int = 200) -> None:
    """A `curl` that plays the Kubernetes API for Secrets: POST creates (409 if it
    exists), GET returns it pretty-printed, as the API server does with ?pretty=true
    (or answers `get_code` with an empty body when that is not 200)."""
    script = bin_dir / "curl"
    script.write_text(
        f"""#!{sys.executable}
import json, pathlib, sys
args = sys.argv[1:]
out = args[args.index("-o") + 1]
url = args[-1].split("?")[0]
store = pathlib.Path({str(store)!r})
if "-X" in args:
    body = json.loads(args[args.index("-d") + 1])
    ns = url.split("/namespaces/")[1].split("/")[0]
    path = store / ns / body["metadata"]["name"]
    code = 409 if path.exists() else 201
    if code == 201:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(body))
    pathlib.Path(out).write_text("{{}}")
else:
    ns, name = url.split("/namespaces/")[1].split("/secrets/")
    path = store / ns / name
    code = {get_code} if {get_code} != 200 else 200 if path.exists() else 404
    text = json.dumps(json.loads(path.read_text()), indent=2) if code == 200 else "{{}}"
    pathlib.Path(out).write_text(text)
print(code, end="")
"""
    )
    script.chmod(0o755)


def _secrets_job_against_fake_api(
    rendered, tmp_path: Path, store: Path, get_code: int = 200
) -> Callable[[], subprocess.CompletedProcess[str]]:
    """Runs the Job's script with `sh -e` against `_fake_api` keeping Secrets in `store`."""
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no POSIX sh")
    script = _secrets_job(rendered["base"])["spec"]["template"]["spec"]["containers"][0]["args"][0]
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("token")
    script = script.replace("/var/run/secrets/kubernetes.io/serviceaccount", str(sa))
    script = script.replace("/tmp/body", str(tmp_path / "body"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_api(bin_dir, store, get_code)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    return lambda: subprocess.run([sh, "-ec", script], env=env, capture_output=True, text=True)


def test_secrets_job_creates_once_and_keeps_them_on_reapply(rendered, tmp_path: Path) -> None:
    """The Job's script against a fake API: four Secrets with random URL-safe values, the
    kubeflow copy equal to refine-af's, and a second run (a re-apply) changes nothing."""
    store = tmp_path / "api"
    job = _secrets_job_against_fake_api(rendered, tmp_path, store)

    def run() -> tuple[str, dict[tuple[str, str], dict[str, str]]]:
        proc = job()
        assert proc.returncode == 0, proc.stderr
        secrets = {}
        for path in sorted(store.glob("*/*")):
            data = json.loads(path.read_text())["data"]
            secrets[(path.parent.name, path.name)] = {
                k: base64.b64decode(v).decode() for k, v in data.items()
            }
        return proc.stdout, secrets

    first_log, first = run()
    assert {k: set(v) for k, v in first.items()} == JOB_SECRETS
    assert first_log.count("created Secret") == 4
    for (_ns, _name), values in first.items():
        for key, value in values.items():
            if "PASSWORD" in key or "SECRET" in key:
                assert re.fullmatch(r"[0-9a-f]{48}", value), (key, value)
    assert first[(KFP_NAMESPACE, "refine-af-s3")] == first[(NAMESPACE, "refine-af-s3")]
    second_log, second = run()
    assert second == first
    assert second_log.count("exists; kept") == 4


def test_secrets_job_stops_when_it_cannot_read_the_secret_it_copies(
    rendered, tmp_path: Path
) -> None:
    """A failed read of refine-af/refine-af-s3 stops the Job (it retries) instead of
    creating the kubeflow copy with empty values, which later runs would then keep."""
    store = tmp_path / "api"
    proc = _secrets_job_against_fake_api(rendered, tmp_path, store, get_code=403)()
    assert proc.returncode != 0
    assert "reading Secret refine-af/refine-af-s3 failed: HTTP 403" in proc.stderr
    assert not (store / KFP_NAMESPACE).exists()


def test_no_literal_credentials_in_env_or_configmaps(rendered) -> None:
    for where, _spec, container in _containers(rendered):
        for env in container.get("env", []):
            value = env.get("value")
            if value is None:
                continue
            assert not SENSITIVE_NAME.search(env["name"]), (
                f"{where}: {env['name']} has a literal value"
            )
            for match in URL_CREDENTIALS.finditer(value):
                for part in ("user", "password"):
                    assert ONLY_VAR_REFS.match(match[part]), (
                        f"{where}: {env['name']} embeds a credential"
                    )
    for rel, obj in _all_objects(rendered):
        if obj["kind"] == "ConfigMap":
            for key, value in obj.get("data", {}).items():
                assert not SENSITIVE_NAME.search(key), f"{rel}: {_name(obj)} key {key}"
                assert not URL_CREDENTIALS.search(value), f"{rel}: {_name(obj)} key {key}"


# ---------------------------------------------------------------- KFP glue


def test_kfp_launcher_points_at_refine_af_minio(rendered) -> None:
    objs = rendered["base"]
    [launcher] = [
        o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "kfp-launcher"
    ]
    assert launcher["metadata"]["namespace"] == KFP_NAMESPACE
    assert launcher["data"]["defaultPipelineRoot"] == "s3://refine-af-artifacts/pipelines"
    s3 = yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]
    assert s3["endpoint"] == "minio.refine-af.svc.cluster.local:9000"
    assert s3["disableSSL"] is True
    assert s3["region"]
    ref = s3["credentials"]["secretRef"]
    assert s3["credentials"]["fromEnv"] is False
    assert (KFP_NAMESPACE, ref["secretName"]) in JOB_SECRETS


def test_kfp_install_patches_the_same_launcher_config(rendered) -> None:
    """Re-applying k8s/kfp/platform-agnostic keeps refine-af's launcher settings (item 10)."""
    patch = yaml.safe_load((K8S / "kfp" / "platform-agnostic" / "kfp-launcher.yaml").read_text())
    [launcher] = [
        o
        for o in rendered["base"]
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "kfp-launcher"
    ]
    assert patch["data"] == launcher["data"]
    assert patch["metadata"]["namespace"] == KFP_NAMESPACE
    kustomization = yaml.safe_load(
        (K8S / "kfp" / "platform-agnostic" / "kustomization.yaml").read_text()
    )
    assert {"path": "kfp-launcher.yaml"} in kustomization["patches"]


def test_kfp_mlflow_plugin_points_at_this_stack(rendered) -> None:
    """The API server's MLflow plugin uses refine-af's MLflow (item 13) and injects the
    run id the stages log into."""
    folder = K8S / "kfp" / "platform-agnostic"
    config = json.loads((folder / "apiserver-config.json").read_text())
    plugin = config["plugins"]["mlflow"]
    [endpoints] = [o for o in rendered["base"] if o["metadata"]["name"] == "refine-af-endpoints"]
    assert plugin["endpoint"] == endpoints["data"]["MLFLOW_TRACKING_URI"]
    assert "opendatahub" not in json.dumps(config)
    assert plugin["settings"]["injectUserEnvVars"] is True
    assert plugin["settings"]["authType"] == "none"
    patch = yaml.safe_load((folder / "apiserver-config.yaml").read_text())
    [container] = patch["spec"]["template"]["spec"]["containers"]
    assert container["volumeMounts"][0]["mountPath"] == "/config/config.json"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    [generator] = kustomization["configMapGenerator"]
    assert generator["files"] == ["config.json=apiserver-config.json"]
    volume = patch["spec"]["template"]["spec"]["volumes"][0]
    assert volume["configMap"]["name"] == generator["name"]


def test_kfp_manifests_are_pinned_to_a_release() -> None:
    """k8s/kfp/ pulls upstream manifests at render time: a tag, never a branch."""
    refs = set()
    kustomizations = sorted((K8S / "kfp").rglob("kustomization.yaml"))
    assert [p.parent.name for p in kustomizations] == ["cluster-scoped", "platform-agnostic"]
    for path in kustomizations:
        resources = yaml.safe_load(path.read_text())["resources"]
        assert resources, path
        for resource in resources:
            assert resource.startswith("github.com/kubeflow/pipelines/manifests/kustomize/"), (
                resource
            )
            match = re.search(r"\?ref=(?P<ref>[^&]+)$", resource)
            assert match, f"{path}: {resource} has no ?ref="
            # 2.17.0 is the newest 2.17 tag of kubeflow/pipelines (checked against the
            # repository's tags; docs/deploy.md says how); there is no 2.17.1.
            assert match["ref"] == "2.17.0", f"{path}: ref {match['ref']} is not 2.17.0"
            refs.add(match["ref"])
    assert len(refs) == 1, f"both KFP kustomizations must use the same release: {refs}"


# What KFP 2.17.0's driver, launcher and Argo's executor call from a step's pod.
PIPELINE_ROLE_RULES = [
    {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": ["kfp-launcher"],
        "verbs": ["get"],
    },
    {
        "apiGroups": [""],
        "resources": ["secrets"],
        "resourceNames": ["refine-af-s3"],
        "verbs": ["get"],
    },
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
    {"apiGroups": ["argoproj.io"], "resources": ["workflows"], "verbs": ["get"]},
    {
        "apiGroups": ["argoproj.io"],
        "resources": ["workflowtaskresults"],
        "verbs": ["create", "patch"],
    },
]


def test_pipeline_rbac_is_least_privilege(rendered) -> None:
    """Item 11: exactly the calls of KFP 2.17.0, no ClusterRoles, no accounts upstream lacks."""
    objs = rendered["base"]
    assert not [o for o in objs if o["kind"] in {"ClusterRole", "ClusterRoleBinding"}]
    roles = {
        (r["metadata"]["namespace"], r["metadata"]["name"]): r for r in objs if r["kind"] == "Role"
    }
    assert roles[(KFP_NAMESPACE, "refine-af-pipeline")]["rules"] == PIPELINE_ROLE_RULES
    for role in roles.values():
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], _name(role)
            assert "*" not in rule.get("apiGroups", []), _name(role)
            if "secrets" in rule["resources"] and rule["verbs"] != ["create"]:
                assert rule["verbs"] == ["get"] and rule.get("resourceNames"), _name(role)
    accounts = {
        (o["metadata"]["namespace"], o["metadata"]["name"])
        for o in objs
        if o["kind"] == "ServiceAccount"
    }
    assert accounts == {(KFP_NAMESPACE, "refine-af-pipeline"), (NAMESPACE, "refine-af-secrets")}
    for binding in (o for o in objs if o["kind"] == "RoleBinding"):
        for subject in binding["subjects"]:
            assert (subject["namespace"], subject["name"]) in accounts, _name(binding)
    # Only the secrets Job may create Secrets.
    creators = [
        r
        for r in roles.values()
        if any("create" in x["verbs"] and "secrets" in x["resources"] for x in r["rules"])
    ]
    assert {r["metadata"]["name"] for r in creators} == {"refine-af-secrets"}


# ---------------------------------------------------------------- network


def _selects(policy: dict[str, Any], app: str) -> bool:
    selector = policy["spec"]["podSelector"]
    if selector.get("matchLabels", {}).get("app.kubernetes.io/name") == app:
        return True
    return any(
        expr["key"] == "app.kubernetes.io/name"
        and expr["operator"] == "In"
        and app in expr["values"]
        for expr in selector.get("matchExpressions", [])
    )


def test_network_policies_cover_every_stateful_service(rendered) -> None:
    for rel, objs in rendered.items():
        policies = [
            o
            for o in objs
            if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == NAMESPACE
        ]
        deny = [
            p
            for p in policies
            if p["spec"]["podSelector"] == {}
            and p["spec"]["policyTypes"] == ["Ingress"]
            and not p["spec"].get("ingress")
        ]
        assert deny, f"{rel}: no default-deny ingress policy"
        deployed = {o["metadata"]["name"] for o in objs if _pod_spec(o) is not None}
        for app in (a for a in STATEFUL_SERVICES if a in deployed):
            assert any(_selects(p, app) for p in policies), f"{rel}: no NetworkPolicy for {app}"


def test_base_network_policies_admit_only_this_namespace_and_kfp(rendered) -> None:
    policies = [o for o in rendered["base"] if o["kind"] == "NetworkPolicy"]
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{_name(policy)}: a rule without `from` admits everyone"
            for peer in rule["from"]:
                assert "ipBlock" not in peer, _name(policy)
                if "namespaceSelector" in peer:
                    assert peer["namespaceSelector"] == {
                        "matchLabels": {"kubernetes.io/metadata.name": KFP_NAMESPACE}
                    }, _name(policy)
    [postgres] = [p for p in policies if _selects(p, "postgres")]
    peers = [peer for rule in postgres["spec"]["ingress"] for peer in rule["from"]]
    assert peers == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]


# ---------------------------------------------------------------- overlays


def _node_ports(objs: list[dict[str, Any]]) -> dict[str, int]:
    ports = {}
    for obj in objs:
        if obj["kind"] == "Service" and obj["spec"].get("type") == "NodePort":
            for port in obj["spec"]["ports"]:
                ports[f"{obj['metadata']['name']}:{port['port']}"] = port["nodePort"]
    return ports


def test_kind_node_ports_match_the_cluster_config(rendered) -> None:
    node_ports = _node_ports(rendered["overlays/kind"])
    assert node_ports == {
        "mlflow:5000": 30500,
        "minio:9000": 30900,
        "minio:9001": 30901,
        "ml-pipeline-ui-nodeport:80": 30880,
    }
    cluster = yaml.safe_load((K8S / "kind" / "cluster.yaml").read_text())
    assert cluster["kind"] == "Cluster" and cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    mappings = [m for node in cluster["nodes"] for m in node.get("extraPortMappings", [])]
    assert sorted(m["containerPort"] for m in mappings) == sorted(node_ports.values())
    for mapping in mappings:
        assert mapping["hostPort"] == mapping["containerPort"]
        assert mapping["listenAddress"] == "127.0.0.1"
    # allow-nodeports.yaml excludes the pod subnet it assumes.
    assert cluster["networking"]["podSubnet"] == "10.244.0.0/16"
    assert _node_ports(rendered["overlays/minikube"]) == node_ports


def test_external_s3_overlay_points_everything_at_one_endpoint(rendered) -> None:
    """Item 15: one overlay drops MinIO and sends pipeline artifacts, MLflow's files and
    the launcher to another S3 endpoint (as shipped: KFP 2.17's SeaweedFS)."""
    objs = rendered["overlays/external-s3"]
    assert not [o for o in objs if "minio" in o["metadata"]["name"] and o["kind"] != "Secret"
                and o["metadata"]["name"] != "minio-root"]  # fmt: skip
    [endpoints] = [o for o in objs if o["metadata"]["name"] == "refine-af-endpoints"]
    url = endpoints["data"]["AWS_ENDPOINT_URL"]
    assert url == endpoints["data"]["MLFLOW_S3_ENDPOINT_URL"]
    assert url == "http://seaweedfs.kubeflow.svc.cluster.local:8333"
    [mlflow] = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow"]
    env = {
        e["name"]: e.get("value")
        for e in mlflow["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["MLFLOW_S3_ENDPOINT_URL"] == url
    [launcher] = [o for o in objs if o["metadata"]["name"] == "kfp-launcher"]
    s3 = yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]
    assert f"http://{s3['endpoint']}" == url
    assert s3["credentials"]["secretRef"]["secretName"] == "refine-af-s3"
    [policy] = [o for o in objs if o["metadata"]["name"] == "refine-af-to-seaweedfs"]
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": 8333, "protocol": "TCP"}]
    base_names = {(o["kind"], o["metadata"]["name"]) for o in rendered["base"]}
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert base_names - names == {
        ("Deployment", "minio"), ("Service", "minio"), ("PersistentVolumeClaim", "minio-data"),
        ("Job", "minio-buckets"), ("NetworkPolicy", "minio-ingress"),
    }  # fmt: skip


def test_model_cache_component_is_a_valid_rwx_claim(tmp_path: Path) -> None:
    """The claim `refine-af submit --model-cache refine-af-models` mounts, in the namespace
    pipeline pods run in, shareable across nodes."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    overlay = tmp_path / "k8s" / "overlays" / "with-cache"
    tree = _render_tree(tmp_path)
    overlay.mkdir(parents=True)
    (overlay / "kustomization.yaml").write_text(
        "resources: [../../base]\ncomponents: [../../components/model-cache]\n"
    )
    objs = _kustomize(tree, "overlays/with-cache")
    [claim] = [
        o
        for o in objs
        if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "refine-af-models"
    ]
    assert claim["metadata"]["namespace"] == KFP_NAMESPACE
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(claim, K8S_SCHEMA_VERSION, strict=True)


def test_serving_overlay_runs_vllm_with_lora_on_a_gpu(rendered) -> None:
    objs = rendered["overlays/serving"]
    [deploy] = [o for o in objs if o["kind"] == "Deployment" and _name(o).endswith("vllm")]
    spec = deploy["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert container["image"].startswith("vllm/vllm-openai:v")
    assert container["command"] == ["vllm", "serve"] and "--enable-lora" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    claim = volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"]
    assert any(
        o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == claim for o in objs
    )
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
    [service] = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "vllm"]
    assert service["spec"]["ports"][0]["port"] == 8000
    assert any(o["kind"] == "NetworkPolicy" and _selects(o, "vllm") for o in objs)


def object_counts(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    return {rel: len(objs) for rel, objs in rendered.items()}


def test_object_counts(rendered, record_property) -> None:
    counts = object_counts(rendered)
    for rel, count in counts.items():
        record_property(f"objects[{rel}]", count)
    assert counts["."] == counts["base"]
    for overlay in ("overlays/kind", "overlays/minikube"):
        assert counts[overlay] > counts["base"], overlay


def main() -> None:
    """Print the rendered object count of every kustomization."""
    import tempfile

    if KUBECTL is None:
        sys.exit("kubectl is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        tree = _render_tree(Path(tmp))
        for rel in KUSTOMIZATION_DIRS:
            objs = _kustomize(tree, rel)
            kinds = Counter(o["kind"] for o in objs)
            detail = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
            print(f"k8s/{rel if rel != '.' else ''}: {len(objs)} objects ({detail})")


if __name__ == "__main__":
    main()
