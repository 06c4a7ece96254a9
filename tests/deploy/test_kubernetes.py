"""deploy/k8s: the kustomize base and GPU overlay, built the way kustomize builds them and
validated against the Kubernetes API schemas that kubernetes-validate ships.

The loader below understands exactly the kustomization features the files use
(resources, namespace, JSON 6902 patches with a target) and refuses any other, so a new
feature cannot be silently skipped; when kubectl is installed its own `kubectl kustomize`
output is compared with the loader's.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from falaj_platform.runtime.settings import COMPONENTS, GATEWAY, SERVICES, load_settings
from tests.deploy.project import IMAGE_USER_ID, ROOT, command_problem, load_yaml, load_yaml_documents

K8S = ROOT / "deploy" / "k8s"
VARIANTS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu"}
# The newest Kubernetes release the pinned kubernetes-validate ships schemas for.
KUBERNETES_VERSION = "1.37.0"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass", "PriorityClass"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "patches"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}

Object = dict[str, Any]


def _matches_target(obj: Object, target: dict[str, str]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    want = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    unknown = set(target) - set(want)
    assert not unknown, f"patch target fields the loader does not handle: {unknown}"
    return all(want[key] == value for key, value in target.items())


def kustomize_build(folder: Path) -> list[Object]:
    """The objects `kustomize build folder` emits, for the subset of kustomize used here."""
    kustomization = load_yaml(folder / "kustomization.yaml")
    unsupported = set(kustomization) - KUSTOMIZATION_KEYS
    assert not unsupported, f"{folder}: kustomization fields the loader does not handle: {unsupported}"
    objects: list[Object] = []
    for resource in kustomization.get("resources", []):
        path = (folder / resource).resolve()
        objects += kustomize_build(path) if path.is_dir() else load_yaml_documents(path)
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path", "target"}, f"{folder}: only JSON 6902 patch files with a target are handled"
        operations = load_yaml(folder / patch["path"])
        assert isinstance(operations, list), f"{patch['path']} is not a JSON 6902 patch (a list of operations)"
        hits = [i for i, obj in enumerate(objects) if _matches_target(obj, patch["target"])]
        assert len(hits) == 1, f"patch {patch['path']} matches {len(hits)} objects"
        objects[hits[0]] = jsonpatch.apply_patch(objects[hits[0]], operations)
    if namespace := kustomization.get("namespace"):
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    return objects


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[str, list[Object]]:
    return request.param, kustomize_build(VARIANTS[request.param])


@pytest.fixture(scope="module")
def base() -> list[Object]:
    return kustomize_build(VARIANTS["base"])


def _by_kind(objects: list[Object], kind: str) -> dict[str, Object]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def _container(deployment: Object) -> Object:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are evaluated here"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


# -- schema ---------------------------------------------------------------------------------------


def test_kubernetes_validate_ships_the_version_we_validate_against() -> None:
    assert kubernetes_validate.latest_version() == KUBERNETES_VERSION


def test_every_object_is_valid_for_kubernetes(variant: tuple[str, list[Object]]) -> None:
    name, objects = variant
    problems = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {error.message} at {'/'.join(map(str, error.path))}")
    assert not problems, f"{name}:\n" + "\n".join(problems)


def test_validation_catches_a_misspelt_field(base: list[Object]) -> None:
    broken = copy.deepcopy(_by_kind(base, "Deployment")["ingest"])
    _container(broken)["readinesProbe"] = _container(broken).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_kubectl_kustomize_builds_the_same_objects(name: str) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed; the loader's reading of kustomize is not cross-checked")
    result = subprocess.run(["kubectl", "kustomize", str(VARIANTS[name])], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

    def keyed(objects: list[Object]) -> dict[tuple[str, str], Object]:
        return {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}

    assert keyed([o for o in yaml.safe_load_all(result.stdout) if o]) == keyed(kustomize_build(VARIANTS[name]))


# -- workloads -----------------------------------------------------------------------------------------


def test_one_deployment_and_service_per_component(variant: tuple[str, list[Object]]) -> None:
    _, objects = variant
    assert set(_by_kind(objects, "Deployment")) == set(COMPONENTS)
    assert set(_by_kind(objects, "Service")) == set(COMPONENTS)
    assert {obj["metadata"].get("namespace") for obj in objects if obj["kind"] != "Namespace"} == {"falaj"}


def test_every_deployment_has_probes_and_resources(variant: tuple[str, list[Object]]) -> None:
    _, objects = variant
    for name, deployment in _by_kind(objects, "Deployment").items():
        container = _container(deployment)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"] == ["falaj", "health", name], f"{name}.{probe}"
        assert command_problem(container["readinessProbe"]["exec"]["command"]) is None
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), name
        assert {"cpu", "memory"} <= set(resources["limits"]), name


def test_every_container_command_is_a_project_entry_point(variant: tuple[str, list[Object]]) -> None:
    _, objects = variant
    for name, deployment in _by_kind(objects, "Deployment").items():
        command = _container(deployment)["command"]
        module = "falaj_platform.gateway" if name == GATEWAY else f"falaj_platform.services.{name}"
        assert command == ["python", "-m", module]
        assert command_problem(command) is None


def test_pods_run_as_the_images_non_root_user_without_privileges(variant: tuple[str, list[Object]]) -> None:
    _, objects = variant
    for name, deployment in _by_kind(objects, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == IMAGE_USER_ID, name
        assert pod["automountServiceAccountToken"] is False
        context = _container(deployment)["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]


def _pod_environment(deployment: Object, configmaps: dict[str, Object]) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """(env as the container sees it, secret references by variable)."""
    container = _container(deployment)
    env: dict[str, str] = {}
    secrets: dict[str, tuple[str, str]] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            secrets[variable["name"]] = (ref["name"], ref["key"])
            env[variable["name"]] = f"postgresql://falaj_{ref['key']}:secret@postgres.example:5432/falaj_{ref['key']}"
    return env, secrets


def _projected_files(deployment: Object, mount_path: str) -> dict[str, tuple[str, str]]:
    """File path -> (Secret or ConfigMap, key) of the projected volume mounted at mount_path."""
    container = _container(deployment)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == mount_path)
    assert mount.get("readOnly") is True
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    files = {}
    for source in volume["projected"]["sources"]:
        ((_, projected),) = source.items()
        for item in projected["items"]:
            files[f"{mount_path}/{item['path']}"] = (projected["name"], item["key"])
    return files


@pytest.mark.parametrize("component", COMPONENTS)
def test_component_settings_from_the_pod_environment(component: str, base: list[Object]) -> None:
    deployments, services = _by_kind(base, "Deployment"), _by_kind(base, "Service")
    deployment = deployments[component]
    env, secrets = _pod_environment(deployment, _by_kind(base, "ConfigMap"))
    settings = load_settings(component, env=env)
    ports = {p["name"]: p["containerPort"] for p in _container(deployment)["ports"]}

    assert settings.listen_addr == f"0.0.0.0:{ports['grpc']}"
    assert settings.metrics_addr == f"0.0.0.0:{ports['metrics']}"
    assert secrets[f"FALAJ_{component.upper()}_DATABASE_URL"] == ("falaj-database-urls", component)
    # Every identity file the settings point at is projected from a Secret.
    files = _projected_files(deployment, str(settings.pki_dir))
    assert files[str(settings.pki.ca_cert)] == ("falaj-pki-ca", "ca.pem")
    assert files[str(settings.pki.cert)] == (f"falaj-pki-{component}", "cert.pem")
    assert files[str(settings.pki.key)] == (f"falaj-pki-{component}", "key.pem")
    # Data on the component's own persistent volume.
    mounts = {m["mountPath"]: m["name"] for m in _container(deployment)["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    home = volumes[mounts[str(settings.home)]]
    assert home["persistentVolumeClaim"]["claimName"] in _by_kind(base, "PersistentVolumeClaim")

    if component == GATEWAY:
        assert files[str(settings.audit_signing_key)] == ("falaj-audit-signing-key", "signing-key.pem")
        # The gateway binds clients to roles from $FALAJ_PKI_DIR/clients/<name>/identity.json.
        assert files[f"{settings.pki_dir}/clients/admin/identity.json"] == ("falaj-client-identities", "admin.json")
        for service in SERVICES:
            (address,) = settings.upstreams[service]
            host, _, port = address.rpartition(":")
            grpc_port = next(p for p in services[host]["spec"]["ports"] if p["name"] == "grpc")
            assert int(port) == grpc_port["port"], service
    else:
        host, _, port = settings.gateway_addr.rpartition(":")
        assert host == GATEWAY and int(port) == next(p["port"] for p in services[GATEWAY]["spec"]["ports"] if p["name"] == "grpc")


def test_services_select_their_pods_and_name_real_ports(base: list[Object]) -> None:
    deployments = _by_kind(base, "Deployment")
    for name, service in _by_kind(base, "Service").items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert _selects({"matchLabels": service["spec"]["selector"]}, labels)
        selected = [
            d
            for d, dep in deployments.items()
            if _selects({"matchLabels": service["spec"]["selector"]}, dep["spec"]["template"]["metadata"]["labels"])
        ]
        assert selected == [name]
        container_ports = {p["name"] for p in _container(deployments[name])["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
        # Services are headless so the gateway's round-robin sees every ready pod.
        assert (service["spec"].get("clusterIP") == "None") == (name != GATEWAY)


# -- network policy ------------------------------------------------------------------------------------------


def _allowed_ingress(policies: dict[str, Object], pod_labels: dict[str, str]) -> list[tuple[str, Any, str]]:
    """(source, peer, port) of every ingress the policies selecting this pod allow."""
    allowed = []
    for policy in policies.values():
        spec = policy["spec"]
        if not _selects(spec["podSelector"], pod_labels):
            continue
        assert spec["policyTypes"] == ["Ingress"]
        for rule in spec.get("ingress", []):
            peers = rule.get("from") or ["anywhere"]
            ports = [p["port"] for p in rule.get("ports", [])] or ["any port"]
            allowed += [(policy["metadata"]["name"], peer, port) for peer in peers for port in ports]
    return allowed


def test_everything_else_is_denied_by_default(base: list[Object]) -> None:
    deny = _by_kind(base, "NetworkPolicy")["default-deny-ingress"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}


def test_only_the_gateway_reaches_the_services_and_prometheus_their_metrics(base: list[Object]) -> None:
    policies = _by_kind(base, "NetworkPolicy")
    deployments = _by_kind(base, "Deployment")
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}
    for service in SERVICES:
        allowed = _allowed_ingress(policies, pods[service])
        assert allowed, f"{service} is selected by no policy that lets the gateway in"
        for _, peer, port in allowed:
            assert peer != "anywhere", f"{service} accepts {port} from anywhere"
            assert set(peer) <= {"podSelector", "namespaceSelector"}, peer
            if port == "grpc":
                # Same namespace, and the gateway's pods only: no service reaches another directly.
                assert "namespaceSelector" not in peer
                matched = {name for name, labels in pods.items() if _selects(peer["podSelector"], labels)}
                assert matched == {GATEWAY}, f"{service} gRPC is open to {matched}"
            else:
                assert port == "metrics", f"{service}: unexpected port {port}"
                assert peer["podSelector"] == {"matchLabels": PROMETHEUS}
        ports = {p["name"] for p in _container(deployments[service])["ports"]}
        assert {port for _, _, port in allowed} == {"grpc", "metrics"} <= ports


def test_the_gateway_takes_clients_on_its_grpc_port_only(base: list[Object]) -> None:
    policies = _by_kind(base, "NetworkPolicy")
    labels = _by_kind(base, "Deployment")[GATEWAY]["spec"]["template"]["metadata"]["labels"]
    allowed = {(port, "anywhere" if peer == "anywhere" else "prometheus") for _, peer, port in _allowed_ingress(policies, labels)}
    assert allowed == {("grpc", "anywhere"), ("metrics", "prometheus")}


def test_policy_check_notices_a_rule_open_to_every_pod(base: list[Object]) -> None:
    policies = copy.deepcopy(_by_kind(base, "NetworkPolicy"))
    policies["services-from-gateway"]["spec"]["ingress"][0]["from"][0]["podSelector"] = {
        "matchLabels": {"app.kubernetes.io/part-of": "falaj"}
    }
    broken = [obj for obj in base if obj["kind"] != "NetworkPolicy"] + list(policies.values())
    with pytest.raises(AssertionError, match="gRPC is open to"):
        test_only_the_gateway_reaches_the_services_and_prometheus_their_metrics(broken)


# -- the GPU variant -------------------------------------------------------------------------------------------


def test_gpu_overlay_runs_training_on_a_gpu_node() -> None:
    gpu = _by_kind(kustomize_build(VARIANTS["gpu"]), "Deployment")
    training = gpu["training"]
    pod = training["spec"]["template"]["spec"]
    container = _container(training)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith("-cuda")
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_gpu_overlay_changes_nothing_but_training(base: list[Object]) -> None:
    gpu = kustomize_build(VARIANTS["gpu"])
    changed = [(o["kind"], o["metadata"]["name"]) for o, b in zip(gpu, base, strict=True) if o != b]
    assert changed == [("Deployment", "training")]
    assert "nvidia.com/gpu" not in _container(_by_kind(base, "Deployment")["training"])["resources"]["limits"]


def test_gpu_patch_refuses_a_training_deployment_whose_first_container_is_not_training(base: list[Object]) -> None:
    training = copy.deepcopy(_by_kind(base, "Deployment")["training"])
    training["spec"]["template"]["spec"]["containers"].insert(0, {"name": "sidecar", "image": "busybox"})
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(training, load_yaml(VARIANTS["gpu"] / "training-gpu.yaml"))
