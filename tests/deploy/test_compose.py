"""docker-compose.yml, the Dockerfile and the observability files, checked without a Docker engine.

The compose file is validated against the Compose Specification's JSON schema (vendored
under schemas/), and each container's command and settings are checked against the
code: entry points that exist, the settings loader's own reading of the environment,
the metrics the code defines.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest

from falaj_platform.runtime.settings import COMPONENTS, DEFAULT_METRICS_PORTS, DEFAULT_PORTS, GATEWAY, SERVICES, load_settings
from tests.deploy.project import IMAGE_USER_ID, ROOT, command_problem, defined_metrics, interpolate, load_yaml, metric_family

COMPOSE_FILES = [ROOT / "docker-compose.yml", ROOT / "deploy" / "docker-compose.ui.yml"]
SCHEMA = ROOT / "tests" / "deploy" / "schemas" / "compose-spec.json"
PKI_MOUNT = "/etc/falaj/pki"
DATA_MOUNT = "/var/lib/falaj"
GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "docker-compose.yml")


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """The container's environment as Compose would pass it, with no variables set on the host."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {key: interpolate(str(value), {}) for key, value in raw.items()}


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only) for the short volume syntax this file uses."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target, *mode = entry.split(":")
        mounts[target] = (source, mode == ["ro"])
    return mounts


def _is_platform(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).startswith("falaj/platform:")


# -- the specification ------------------------------------------------------------------------


def test_vendored_schema_is_a_valid_json_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft201909Validator.check_schema(schema)
    assert schema["title"] == "Compose Specification"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_the_compose_specification(path: Path) -> None:
    validator = jsonschema.Draft201909Validator(json.loads(SCHEMA.read_text()))
    errors = sorted(validator.iter_errors(load_yaml(path)), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def test_durations_are_compose_durations(services: dict[str, dict[str, Any]]) -> None:
    # The schema marks these `format: duration` but jsonschema does not check that format.
    found = []
    for name, service in services.items():
        values = {"stop_grace_period": service.get("stop_grace_period")}
        for key in ("interval", "timeout", "start_period"):
            values[f"healthcheck.{key}"] = (service.get("healthcheck") or {}).get(key)
        found += [f"{name}.{key}={value!r}" for key, value in values.items() if value is not None and not GO_DURATION.match(value)]
    assert not found


# -- what runs -----------------------------------------------------------------------------------


def test_every_component_runs_in_its_own_container(services: dict[str, dict[str, Any]]) -> None:
    assert set(COMPONENTS) <= set(services)
    assert {"postgres", "redis", "pki", "prometheus", "grafana"} <= set(services)


def test_every_platform_command_is_a_project_entry_point(services: dict[str, dict[str, Any]]) -> None:
    checked = 0
    problems = []
    for name, service in services.items():
        if not _is_platform(service):
            continue
        commands = [service["command"]]
        test = (service.get("healthcheck") or {}).get("test")
        if test:
            assert test[0] == "CMD", f"{name}: health check should exec the command directly, not through a shell"
            commands.append(test[1:])
        for argv in commands:
            checked += 1
            if problem := command_problem(argv):
                problems.append(f"{name}: {problem}")
    assert not problems
    assert checked == 2 * len(COMPONENTS) + 1  # each component and its health check, and the PKI job


def test_command_checker_rejects_what_is_not_an_entry_point() -> None:
    assert command_problem(["python", "-m", "falaj_platform.services.nosuch"])
    assert command_problem(["python", "-m", "falaj_platform.runtime"])  # a package without __main__
    assert command_problem(["falaj", "health", "nosuch"])
    assert command_problem(["falaj-gateway"])
    assert command_problem(["falaj", "serve", "gateway"]) is None


def test_each_component_runs_itself_and_checks_its_own_health(services: dict[str, dict[str, Any]]) -> None:
    for component in COMPONENTS:
        module = "falaj_platform.gateway" if component == GATEWAY else f"falaj_platform.services.{component}"
        assert services[component]["command"] == ["python", "-m", module]
        assert services[component]["healthcheck"]["test"] == ["CMD", "falaj", "health", component]
    assert services["pki"]["command"] == ["falaj", "pki", "init"]


def test_every_platform_container_uses_the_one_image_built_here(services: dict[str, dict[str, Any]]) -> None:
    platform = {name: s for name, s in services.items() if _is_platform(s)}
    assert set(platform) == {*COMPONENTS, "pki"}
    assert len({s["image"] for s in platform.values()}) == 1
    for name, service in platform.items():
        assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}, name
        assert service.get("read_only") is True and service.get("cap_drop") == ["ALL"], name


def test_third_party_images_are_pinned_to_exact_versions(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if _is_platform(service):
            continue
        image = service["image"]
        _, _, tag = image.rpartition(":")
        assert re.match(r"^v?\d+\.\d+\.\d+", tag) or re.match(r"^\d+\.\d+-", tag), f"{name}: {image} is not an exact version"


# -- exposure and health --------------------------------------------------------------------------


def test_only_the_gateway_publishes_a_port(services: dict[str, dict[str, Any]]) -> None:
    publishing = {name for name, service in services.items() if service.get("ports")}
    assert publishing == {GATEWAY}
    assert services[GATEWAY]["ports"] == [f"127.0.0.1:{DEFAULT_PORTS[GATEWAY]}:{DEFAULT_PORTS[GATEWAY]}"]


def test_every_long_running_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if service.get("restart") == "no":  # one-shot jobs: others wait for them to complete
            assert "healthcheck" not in service, name
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name} has no health check"


def test_dependencies_wait_for_health_or_completion(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for dependency, rule in depends.items():
            want = "service_completed_successfully" if services[dependency].get("restart") == "no" else "service_healthy"
            assert rule == {"condition": want}, f"{name} -> {dependency}"
    for component in COMPONENTS:
        assert services[component]["depends_on"]["pki"]["condition"] == "service_completed_successfully"
        assert services[component]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert set(SERVICES) <= set(services[GATEWAY]["depends_on"])


# -- settings ---------------------------------------------------------------------------------------


def test_volumes_are_named_and_declared(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose["volumes"])
    used = set()
    for name, service in services.items():
        for target, (source, _) in _mounts(service).items():
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} for {target} is not declared"
                used.add(source)
    assert used == declared


@pytest.mark.parametrize("component", COMPONENTS)
def test_component_settings_from_the_container_environment(component: str, services: dict[str, dict[str, Any]]) -> None:
    service = services[component]
    env = _environment(service)
    settings = load_settings(component, env=env)
    mounts = _mounts(service)

    # Listen on every interface inside the container, on the ports the rest of the file uses.
    assert settings.listen_addr == f"0.0.0.0:{DEFAULT_PORTS[component]}"
    assert settings.metrics_addr == f"0.0.0.0:{DEFAULT_METRICS_PORTS[component]}"
    # Identity from the PKI job's volume, read-only; data on the component's own volume.
    assert mounts[PKI_MOUNT] == ("pki", True)
    for path in (settings.pki.ca_cert, settings.pki.cert, settings.pki.key):
        assert str(path).startswith(PKI_MOUNT + "/"), path
    assert settings.pki.cert == Path(PKI_MOUNT, "services", component, "cert.pem")
    assert mounts[DATA_MOUNT] == (f"{component}-data", False)
    assert str(settings.data_dir).startswith(DATA_MOUNT + "/")
    # Its own PostgreSQL database, as its own role.
    url = urlsplit(settings.database_url)
    assert (url.scheme, url.hostname, url.port, url.path) == ("postgresql", "postgres", 5432, f"/falaj_{component}")
    assert url.username == f"falaj_{component}" and url.password
    if component == GATEWAY:
        assert settings.audit_signing_key == Path(PKI_MOUNT, "audit", "signing-key.pem")
        # Upstreams by service name, on each service's listen port.
        assert dict(settings.upstreams) == {name: (f"{name}:{DEFAULT_PORTS[name]}",) for name in SERVICES}
        for name in SERVICES:
            assert name in services
    else:
        assert settings.gateway_addr == f"{GATEWAY}:{DEFAULT_PORTS[GATEWAY]}"
        assert f"{component}:{DEFAULT_PORTS[component]}" == _environment(services[GATEWAY])[f"FALAJ_{component.upper()}_ADDR"]
    assert set(service["expose"]) >= {str(DEFAULT_METRICS_PORTS[component])}


def test_features_keeps_its_online_store_in_the_compose_redis(services: dict[str, dict[str, Any]]) -> None:
    from falaj_platform.services.features.config import load_features_config

    env = _environment(services["features"])
    config = load_features_config(load_settings("features", env=env), env=env)
    assert config.uses_redis and config.redis_connection_string() == "redis:6379,db=0"
    assert config.feast_project == "falaj"
    assert services["features"]["depends_on"]["redis"] == {"condition": "service_healthy"}


def test_pki_job_writes_where_the_components_read(services: dict[str, dict[str, Any]]) -> None:
    job = services["pki"]
    assert _mounts(job)[PKI_MOUNT] == ("pki", False)
    assert _environment(job)["FALAJ_PKI_DIR"] == PKI_MOUNT


def test_postgres_init_script_creates_a_database_per_component(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]
    mounts = _mounts(postgres)
    script = next(source for target, (source, _) in mounts.items() if target.startswith("/docker-entrypoint-initdb.d/"))
    text = (ROOT / script).read_text()
    listed = re.search(r'components="\$\{FALAJ_COMPONENTS:-([^}]*)\}"', text)
    assert listed and listed[1].split() == list(COMPONENTS)
    # The roles' password reaches the script, and is the one the components' URLs carry.
    password = _environment(postgres)["FALAJ_DB_PASSWORD"]
    for component in COMPONENTS:
        assert urlsplit(_environment(services[component])[f"FALAJ_{component.upper()}_DATABASE_URL"]).password == password


# -- Prometheus and Grafana -----------------------------------------------------------------------------


def test_prometheus_scrapes_every_component_metrics_port(services: dict[str, dict[str, Any]]) -> None:
    config = load_yaml(ROOT / "deploy" / "prometheus" / "prometheus.yml")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "falaj")
    targets = {target: group["labels"]["component"] for group in job["static_configs"] for target in group["targets"]}
    want = {}
    for component in COMPONENTS:
        port = _environment(services[component])[f"FALAJ_{component.upper()}_METRICS_ADDR"].rpartition(":")[2]
        want[f"{component}:{port}"] = component
    assert targets == want


def _dashboard() -> dict[str, Any]:
    return json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "falaj-platform.json").read_text())


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    return exprs


def test_dashboard_queries_only_metrics_the_code_defines() -> None:
    families = defined_metrics()
    assert {"falaj_grpc_requests", "falaj_grpc_request_duration_seconds", "falaj_grpc_requests_in_flight"} <= families
    unknown = []
    for expr in _expressions(_dashboard()):
        without_labels = re.sub(r"\{[^}]*\}", "", expr)
        for name in re.findall(r"\b(falaj_[a-z0-9_]+)\b", without_labels):
            if metric_family(name, families) is None:
                unknown.append(name)
    assert not unknown, f"the dashboard queries metrics no code defines: {sorted(set(unknown))}"


def test_dashboard_covers_traffic_errors_latency_and_model_monitoring() -> None:
    exprs = "\n".join(_expressions(_dashboard()))
    assert "rate(falaj_grpc_requests_total" in exprs
    assert 'code!="OK"' in exprs
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (service, le) (rate(falaj_grpc_request_duration_seconds_bucket" in exprs
    assert "falaj_grpc_requests_in_flight" in exprs
    assert re.search(r"falaj_monitoring_\w*drift", exprs) and "falaj_monitoring_quality" in exprs


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus(services: dict[str, dict[str, Any]]) -> None:
    datasource = load_yaml(ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["type"] == "prometheus" and urlsplit(datasource["url"]).hostname == "prometheus"
    dashboard = _dashboard()
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {datasource["uid"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    provider = load_yaml(ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "falaj.yml")["providers"][0]
    grafana_mounts = _mounts(services["grafana"])
    assert grafana_mounts[provider["options"]["path"]] == ("./deploy/grafana/dashboards", True)
    home = _environment(services["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/falaj-platform.json"


# -- the image --------------------------------------------------------------------------------------------


def _dockerfile_stages() -> tuple[dict[str, str], list[list[str]]]:
    """(build args with defaults, one list of instructions per stage), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    args: dict[str, str] = {}
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("ARG ") and not stages:
            name, _, default = line[4:].partition("=")
            args[name] = default
        elif line.startswith("FROM "):
            stages.append([line])
        elif stages:
            stages[-1].append(line)
    return args, stages


def test_dockerfile_is_multi_stage_on_a_pinned_base() -> None:
    args, stages = _dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        image = stage[0].split()[1]
        image = args.get(image.strip("${}"), image)
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image), image
    final = stages[-1]
    assert any(line.startswith("COPY --from=") or "from=wheels" in line for line in final), "the final stage installs the built wheels"
    assert not any("apt-get install" in line for line in final), "no build tools in the runtime image"


def test_dockerfile_runs_as_the_non_root_user_the_deployments_expect() -> None:
    _, stages = _dockerfile_stages()
    users = [line.split()[1] for line in stages[-1] if line.startswith("USER ")]
    assert users and users[-1] == f"{IMAGE_USER_ID}:{IMAGE_USER_ID}"


def test_dockerfile_installs_the_lock_and_both_local_packages() -> None:
    _, stages = _dockerfile_stages()
    build = "\n".join(stages[0])
    final = "\n".join(stages[-1])
    assert "-r requirements" in build and "./sdk ." in build
    # torch is the one package from PyTorch's CPU index, by default.
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in build
    assert '--extra-index-url "${TORCH_INDEX_URL}" "torch==2.13.0"' in build
    assert "torch==2.13.0" in (ROOT / "requirements.lock").read_text().splitlines()
    assert "--no-index" in final and "-r /tmp/requirements.lock" in final
    assert "falaj_sdk-*.whl" in final and "falaj_platform-*.whl" in final


def _dockerignore_keeps(path: str) -> bool:
    """Whether the build context includes `path`, by .dockerignore's rules (last match wins)."""
    keep = True
    parts = path.split("/")
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatchcase(prefix, pattern) and prefix.count("/") == pattern.count("/") for prefix in prefixes)
        if hit:
            keep = negate
    return keep


def test_build_context_holds_what_the_dockerfile_copies_and_no_secrets() -> None:
    _, stages = _dockerfile_stages()
    sources = []
    for stage in stages:
        for line in stage:
            if line.startswith("COPY ") and "--from=" not in line:
                sources += line.split()[1:-1]
    sources.append("requirements.lock")  # bind-mounted from the context in the final stage
    for source in sources:
        assert (ROOT / source).exists(), source
        sample = next((p for p in (ROOT / source).rglob("*.py")), ROOT / source) if (ROOT / source).is_dir() else ROOT / source
        assert _dockerignore_keeps(str(sample.relative_to(ROOT))), f"{sample} is excluded from the build context"
    for excluded in (".falaj/pki/ca-key.pem", ".venv/bin/python", "node_modules/.bin/buf", ".git/config", "sdk-ts/src/index.ts"):
        assert not _dockerignore_keeps(excluded), excluded


# -- a gap the containers depend on --------------------------------------------------------------------


def test_gateway_dials_upstreams_by_service_dns_name() -> None:
    import grpc

    from falaj_platform.gateway.proxy import UpstreamChannels

    channels = UpstreamChannels({"ingest": ("localhost:9",)}, grpc.ssl_channel_credentials(), 1024)
    channel = channels.get("ingest")
    assert channel is not None
    try:
        with pytest.raises(grpc.RpcError) as failure:
            channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=2)
        # A valid target that nothing listens on is UNAVAILABLE; an invalid one is UNKNOWN.
        assert failure.value.code() is grpc.StatusCode.UNAVAILABLE, failure.value.details()
    finally:
        channels.close()
