"""The policy engine: patterns that cannot over-match, the index agreeing with pycasbin, fail-closed."""

from __future__ import annotations

import random

import casbin
import pytest

from falaj_platform.gateway.policy import (
    Authorizer,
    PolicyLine,
    action_of,
    build_enforcer,
    default_policy,
    method_matches,
)


def test_patterns_do_not_over_match_like_key_match_does() -> None:
    # keyMatch's prefix behaviour is the known pitfall: a service-wide grant leaks to a look-alike service.
    assert casbin.util.key_match("/falaj.ingest.v1.IngestServiceAdmin/Drop", "/falaj.ingest.v1.IngestService*")
    assert not method_matches("/falaj.ingest.v1.IngestServiceAdmin/Drop", "/falaj.ingest.v1.IngestService/*")
    assert method_matches("/falaj.ingest.v1.IngestService/GetDataset", "/falaj.ingest.v1.IngestService/*")
    assert method_matches("/falaj.ingest.v1.IngestService/GetDataset", "/falaj.ingest.v1.IngestService/Get*")
    assert not method_matches("/falaj.ingest.v1.IngestService/ListDatasets", "/falaj.ingest.v1.IngestService/Get*")
    assert not method_matches("/falaj.ingest.v1.x.IngestService/Get", "/falaj.*.v1.IngestService/*")
    assert not method_matches("/falaj.ingest.v1.IngestService/Get/extra", "/falaj.ingest.v1.IngestService/*")
    assert not method_matches("/falaj.ingest.v1.IngestService/GetX", "/falaj.ingest.v1.IngestService/Get")
    assert method_matches("/anything.at.All/Here", "*")


@pytest.mark.parametrize(
    ("method", "action"),
    [
        ("/falaj.ingest.v1.IngestService/ListDatasets", "read"),
        ("/falaj.ingest.v1.IngestService/ReadDatasetVersion", "read"),
        ("/falaj.training.v1.TrainingService/DownloadModelArtifact", "read"),
        ("/inference.GRPCInferenceService/ServerLive", "read"),
        ("/inference.GRPCInferenceService/ModelMetadata", "read"),
        ("/inference.GRPCInferenceService/ModelInfer", "predict"),
        ("/falaj.serving.v1.ServingService/StreamPredict", "predict"),
        ("/falaj.ingest.v1.IngestService/EraseSubject", "write"),
        ("/falaj.training.v1.TrainingService/ApprovePromotionRequest", "write"),
    ],
)
def test_action_is_derived_from_the_verb(method: str, action: str) -> None:
    assert action_of(method) == action


def _random_policy(rng: random.Random) -> tuple[list[PolicyLine], list[tuple[str, str, str]]]:
    members = [f"spiffe://falaj.local/client/u{i}" for i in range(6)]
    roles = ["r1", "r2", "r3", "r4"]
    domains = ["ae-dxb", "ae-auh", "t1"]
    services = ["/falaj.ingest.v1.IngestService", "/falaj.serving.v1.ServingService", "/falaj.ingest.v1.IngestServiceAdmin"]
    methods = [f"{s}/{m}" for s in services for m in ("GetA", "ListB", "CreateC", "DeleteD", "ModelInfer")]
    patterns = ["*", *[f"{s}/*" for s in services], *[f"{s}/Get*" for s in services], *methods, "/falaj.*.v1.*/List*"]
    lines = []
    for _ in range(rng.randint(5, 30)):
        subject = rng.choice(roles + members)
        values = (
            subject,
            rng.choice([*domains, "*"]),
            rng.choice(patterns),
            rng.choice(["read", "write", "predict", "*"]),
            rng.choice(["allow"] * 4 + ["deny"]),
        )
        lines.append(PolicyLine("p", values))
    for _ in range(rng.randint(3, 12)):
        member = rng.choice(members + roles)
        lines.append(PolicyLine("g", (member, rng.choice(roles), rng.choice([*domains, "*"]))))
    lines = list(dict.fromkeys(lines))
    requests = [(rng.choice(members + roles), rng.choice(domains), rng.choice(methods)) for _ in range(150)]
    return lines, requests


@pytest.mark.parametrize("seed", range(12))
def test_indexed_decisions_equal_pycasbin_enforce(seed: int) -> None:
    rng = random.Random(seed)
    lines, requests = _random_policy(rng)
    authorizer = Authorizer(lines)
    enforcer = build_enforcer(lines)
    for subject, domain, method in requests:
        expected = enforcer.enforce(subject, domain, method, action_of(method))
        assert authorizer.decide(subject, domain, method).allowed == expected, (subject, domain, method, lines)


def test_default_policy_is_accepted_by_pycasbin_and_denies_unknown_subjects() -> None:
    lines = default_policy(["spiffe://falaj.local/client/admin"])
    enforcer = build_enforcer(lines)
    assert enforcer.enforce("spiffe://falaj.local/client/admin", "ae-dxb", "/falaj.x.v1.Y/Z", "write")
    assert not enforcer.enforce("spiffe://falaj.local/client/stranger", "ae-dxb", "/falaj.ingest.v1.IngestService/ListDatasets", "read")
    assert all(PolicyLine.parse(line.csv()) == line for line in lines)


def test_disabled_pycasbin_allows_but_the_authorizer_denies() -> None:
    lines = [PolicyLine("p", ("viewer", "*", "/falaj.ingest.v1.IngestService/*", "read", "allow"))]
    enforcer = build_enforcer(lines)
    enforcer.enable_enforce(False)
    assert enforcer.enforce("anyone", "ae-dxb", "/falaj.x.v1.Y/Drop", "write")  # the pitfall
    authorizer = Authorizer(lines)
    authorizer.disable()
    decision = authorizer.decide("anyone", "ae-dxb", "/falaj.x.v1.Y/Drop")
    assert not decision.allowed and decision.reason == "ENFORCER_UNAVAILABLE"


def test_cached_decisions_do_not_survive_a_policy_change() -> None:
    grant = PolicyLine("p", ("spiffe://falaj.local/client/a", "*", "/falaj.ingest.v1.IngestService/*", "*", "allow"))
    authorizer = Authorizer([grant], revision=1)
    assert authorizer.decide("spiffe://falaj.local/client/a", "ae-dxb", "/falaj.ingest.v1.IngestService/CreateDataset").allowed
    authorizer.replace([], revision=2)
    assert not authorizer.decide("spiffe://falaj.local/client/a", "ae-dxb", "/falaj.ingest.v1.IngestService/CreateDataset").allowed


@pytest.mark.parametrize(
    "line",
    [
        "x, a, b",
        "p, a, *, /falaj.ingest.v1.IngestService, read",
        "p, a, *, *, drop",
        "g, a, b",
        "p, a, BAD DOMAIN, *, read",
        "p, , *, *, read",
    ],
)
def test_malformed_lines_are_rejected(line: str) -> None:
    with pytest.raises(ValueError):
        PolicyLine.parse(line)
