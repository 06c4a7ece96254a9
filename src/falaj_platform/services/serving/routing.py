"""Traffic splits in memory: which model version answers a request, and in which role.

An `ActiveDeployment` is one deployment's current revision, prepared for the request
path: its routes with their sliding windows, the canary's current share, the shadows.
Choosing a route costs a dictionary lookup and at most one random draw or hash, except
A-B splits, which ask the variant assigner (itself cached).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from falaj.serving.v1 import message_pb2 as pb
from falaj_platform.runtime.errors import InvalidArgument, NotFound
from falaj_platform.services.serving.assignment import VariantAssigner, VariantAssignment
from falaj_platform.services.serving.prediction_log import LogPolicy
from falaj_platform.services.serving.route_metrics import RouteWindow

ROLE_NAMES: dict[int, str] = {
    pb.ROUTE_ROLE_SINGLE: "SINGLE",
    pb.ROUTE_ROLE_STABLE: "STABLE",
    pb.ROUTE_ROLE_CANARY: "CANARY",
    pb.ROUTE_ROLE_VARIANT: "VARIANT",
    pb.ROUTE_ROLE_DEFAULT: "DEFAULT",
    pb.ROUTE_ROLE_SHADOW: "SHADOW",
    pb.ROUTE_ROLE_PINNED: "PINNED",
}
ROUTING_KEY_METADATA = "x-falaj-routing-key"


@dataclass
class Route:
    """One version's part in a split, with its request window."""

    model_version: str
    role: int
    variant_id: str = ""
    percent: float = 0.0
    window: RouteWindow = field(default_factory=RouteWindow)

    @property
    def role_name(self) -> str:
        return ROLE_NAMES.get(self.role, "UNSPECIFIED")


@dataclass(frozen=True)
class Choice:
    """The route that answers a request, and the A-B assignment behind it, if any."""

    route: Route
    assignment: VariantAssignment | None = None
    routing_key: str = ""


def canary_percent(canary: pb.CanaryRouting, step: int) -> float:
    """The canary's share now: the current step's, or the fixed percent without steps."""
    if canary.steps:
        return canary.steps[min(step, len(canary.steps) - 1)].canary_percent
    return canary.canary_percent


def split_versions(split: pb.TrafficSplit) -> list[str]:
    """Every model version the split names (answering and shadow), in order, once."""
    which = split.WhichOneof("strategy")
    versions: list[str] = []
    if which == "single":
        versions.append(split.single.model_version)
    elif which == "canary":
        versions += [split.canary.stable_model_version, split.canary.canary_model_version]
    elif which == "ab_test":
        versions += [route.model_version for route in split.ab_test.variant_routes]
        versions.append(split.ab_test.default_model_version)
    versions += [shadow.model_version for shadow in split.shadows]
    return list(dict.fromkeys(v for v in versions if v))


def default_version(split: pb.TrafficSplit) -> str:
    """The version that answers when nothing else decides (metadata, missing keys)."""
    which = split.WhichOneof("strategy")
    if which == "single":
        return split.single.model_version
    if which == "canary":
        return split.canary.stable_model_version
    if which == "ab_test":
        return split.ab_test.default_model_version
    return ""


def _unit_fraction(key: str, salt: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big") / 2**64


@dataclass
class ActiveDeployment:
    """A deployment's current revision, ready for the request path."""

    id: str
    model: str
    region: str
    revision: int
    split: pb.TrafficSplit
    runtime: pb.ModelRuntimeConfig
    enrichment: pb.FeatureEnrichmentConfig | None
    log_policy: LogPolicy
    canary_step: int = 0
    # Variant -> version for A-B splits; from the split's variant_routes, or else from
    # the experiment's own bindings (resolved when the revision is activated).
    variant_versions: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    routes: dict[tuple[str, int, str], Route] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.strategy = self.split.WhichOneof("strategy") or ""
        self.versions = split_versions(self.split)
        self.default_version = default_version(self.split)
        self._primary: Route | None = None
        self._stable: Route | None = None
        self._canary: Route | None = None
        self._canary_percent = 0.0
        if self.strategy == "single":
            self._primary = self.route(self.split.single.model_version, pb.ROUTE_ROLE_SINGLE, percent=100.0)
        elif self.strategy == "canary":
            self._canary_percent = canary_percent(self.split.canary, self.canary_step)
            self._stable = self.route(self.split.canary.stable_model_version, pb.ROUTE_ROLE_STABLE, percent=100.0 - self._canary_percent)
            self._canary = self.route(self.split.canary.canary_model_version, pb.ROUTE_ROLE_CANARY, percent=self._canary_percent)
        elif self.strategy == "ab_test":
            self._default = self.route(self.split.ab_test.default_model_version, pb.ROUTE_ROLE_DEFAULT)
            self._variant_versions = {r.variant_id: r.model_version for r in self.split.ab_test.variant_routes} or dict(
                self.variant_versions
            )
            self.versions = list(dict.fromkeys([*self.versions, *self._variant_versions.values()]))
            for variant, version in self._variant_versions.items():
                self.route(version, pb.ROUTE_ROLE_VARIANT, variant)
        self.shadows = [
            (self.route(s.model_version, pb.ROUTE_ROLE_SHADOW, percent=s.mirror_percent), s.mirror_percent) for s in self.split.shadows
        ]

    def route(self, version: str, role: int, variant: str = "", percent: float = 0.0) -> Route:
        key = (version, role, variant)
        route = self.routes.get(key)
        if route is None:
            route = self.routes[key] = Route(version, role, variant, percent)
        return route

    @property
    def canary_route(self) -> Route | None:
        return self._canary

    @property
    def stable_route(self) -> Route | None:
        return self._stable

    def version_name(self, version_id: str) -> str:
        return f"{self.model}/versions/{version_id}"

    def choose(self, pinned: str, routing_key: Callable[[str], str], assigner: VariantAssigner | None) -> Choice:
        """The route for one request; `routing_key(name)` reads the key only when a split needs it."""
        if pinned:
            version = self.version_name(pinned)
            if version not in self.versions:
                raise NotFound(
                    f"deployment {self.id} has no version {pinned}; it serves {sorted(v.rsplit('/', 1)[-1] for v in self.versions)}",
                    reason="MODEL_VERSION_NOT_FOUND",
                    metadata={"model": self.id, "version": pinned},
                )
            return Choice(self.route(version, pb.ROUTE_ROLE_PINNED))
        if self._primary is not None:
            return Choice(self._primary)
        if self._canary is not None and self._stable is not None:
            key = routing_key("")
            draw = _unit_fraction(key, f"{self.id}/{self.revision}") if key else random.random()
            return Choice(self._canary if draw * 100.0 < self._canary_percent else self._stable, routing_key=key)
        if self.strategy == "ab_test":
            return self._choose_variant(routing_key, assigner)
        raise NotFound(f"deployment {self.id} has no traffic split", reason="NO_TRAFFIC_SPLIT")

    def _choose_variant(self, routing_key: Callable[[str], str], assigner: VariantAssigner | None) -> Choice:
        ab = self.split.ab_test
        key = routing_key(ab.routing_key)
        if not key:
            if ab.missing_routing_key_action == pb.MISSING_ROUTING_KEY_ACTION_DEFAULT_VERSION:
                return Choice(self._default)
            raise InvalidArgument(
                f"deployment {self.id} routes by {ab.routing_key!r}: send it as a request parameter or in {ROUTING_KEY_METADATA} metadata",
                reason="ROUTING_KEY_MISSING",
                metadata={"routing_key": ab.routing_key},
            )
        if assigner is None:
            return Choice(self._default, routing_key=key)
        assignment = assigner.assign(ab.experiment, key, {ab.routing_key: key})
        if not assignment.in_experiment:
            return Choice(self._default, assignment, key)
        version = self._variant_versions.get(assignment.variant_id, "")
        if not version:
            return Choice(self._default, assignment, key)
        return Choice(self.route(version, pb.ROUTE_ROLE_VARIANT, assignment.variant_id), assignment, key)

    def mirrored(self) -> list[Route]:
        """Shadow routes that get a copy of this request."""
        if not self.shadows:
            return []
        return [route for route, percent in self.shadows if percent >= 100.0 or random.random() * 100.0 < percent]
