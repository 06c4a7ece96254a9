"""Zero-trust authorization: Casbin RBAC with domains over full gRPC method names.

Subject = a SPIFFE ID or a role; domain = tenant or residency region; object = a full
gRPC method or a pattern; action = read, write or predict (derived from the method).
Deny by default; an explicit deny line wins over any allow.

Method patterns cannot over-match: `*` stands for letters, digits and `_` only, so it
never crosses the `.` of a package or the `/` between service and method
(`/falaj.ingest.v1.IngestService/Get*` does not match `/falaj.ingest.v1.IngestServiceX/Get`,
unlike casbin's keyMatch). A pattern that is exactly `*` matches every method.

Decisions are cached per (subject, domain, method) and the cache is replaced whenever
the policy changes, so a decision costs a dict lookup after the first one.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

import casbin

MODEL_TEXT = """
[request_definition]
r = sub, dom, obj, act

[policy_definition]
p = sub, dom, obj, act, eft

[role_definition]
g = _, _, _

[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))

[matchers]
m = g(r.sub, p.sub, r.dom) && domainMatch(r.dom, p.dom) && methodMatch(r.obj, p.obj) && actionMatch(r.act, p.act)
"""

ACTIONS = ("read", "write", "predict")
_READ_VERBS = (
    "Get",
    "List",
    "Read",
    "Query",
    "Export",
    "Verify",
    "Check",
    "Stream",
    "Render",
    "Calculate",
    "Download",
    "Server",
    "ModelReady",
    "ModelMetadata",
)
_PREDICT_METHODS = frozenset({"ModelInfer", "ModelStreamInfer", "StreamPredict"})
_IDENT = "[A-Za-z0-9_]*"
_PATTERN_CHARS = re.compile(r"^[A-Za-z0-9_./*-]+$")
_DOMAIN = re.compile(r"^(\*|[a-z0-9][a-z0-9-]{0,62})$")
MAX_CACHED_DECISIONS = 200_000


def action_of(method: str) -> str:
    """'read', 'write' or 'predict' for a full method name, from its verb."""
    name = method.rsplit("/", 1)[-1]
    if name in _PREDICT_METHODS:
        return "predict"
    return "read" if name.startswith(_READ_VERBS) else "write"


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile("".join(_IDENT if part == "*" else re.escape(part) for part in re.split(r"(\*)", pattern)))


def method_matches(method: str, pattern: str) -> bool:
    """Whether `method` is matched by `pattern` (see the module docstring)."""
    if pattern == "*":
        return True
    return _compiled(pattern).fullmatch(method) is not None


def domain_matches(request_domain: str, policy_domain: str) -> bool:
    return policy_domain == "*" or request_domain == policy_domain


def action_matches(request_action: str, policy_action: str) -> bool:
    return policy_action == "*" or request_action == policy_action


def validate_object_pattern(pattern: str) -> str | None:
    """A reason the pattern is unusable, or None."""
    if pattern == "*":
        return None
    if not pattern.startswith("/") or pattern.count("/") != 2 or not _PATTERN_CHARS.match(pattern):
        return "object must be '*' or '/<package>.<Service>/<Method>' where '*' stands for one name part"
    return None


def validate_domain(domain: str) -> str | None:
    return None if _DOMAIN.match(domain) else "domain must be '*' or a lowercase tenant or region name like 'ae-dxb'"


@dataclass(frozen=True)
class PolicyLine:
    """One Casbin line: `p, sub, dom, obj, act, eft` or `g, member, role, dom`."""

    ptype: str
    values: tuple[str, ...]

    def csv(self) -> str:
        return ", ".join((self.ptype, *self.values))

    @staticmethod
    def parse(line: str) -> PolicyLine:
        """Parse one CSV line; raises ValueError naming what is wrong."""
        parts = [part.strip() for part in line.split(",")]
        ptype, values = parts[0], tuple(parts[1:])
        if ptype == "p":
            if len(values) == 4:
                values = (*values, "allow")
            if len(values) != 5:
                raise ValueError("a 'p' line is: p, subject, domain, object, action[, allow|deny]")
            subject, domain, obj, action, effect = values
            problem = validate_domain(domain) or validate_object_pattern(obj)
            if action not in (*ACTIONS, "*"):
                problem = problem or f"action must be one of {', '.join(ACTIONS)} or '*'"
            if effect not in ("allow", "deny"):
                problem = problem or "effect must be allow or deny"
            if not subject:
                problem = problem or "subject is empty"
        elif ptype == "g":
            if len(values) != 3:
                raise ValueError("a 'g' line is: g, member, role, domain")
            problem = validate_domain(values[2]) or (None if values[0] and values[1] else "member and role must not be empty")
        else:
            raise ValueError(f"unknown line type {ptype!r}; expected p or g")
        if problem:
            raise ValueError(problem)
        return PolicyLine(ptype, values)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # POLICY_ALLOW, POLICY_DENY, NO_MATCHING_POLICY, ENFORCER_UNAVAILABLE
    detail: str


def build_enforcer(lines: Iterable[PolicyLine]) -> casbin.Enforcer:
    """A pycasbin enforcer holding `lines`, with Falaj's matching functions."""
    enforcer = casbin.Enforcer(_model())
    enforcer.add_function("methodMatch", method_matches)
    enforcer.add_function("domainMatch", domain_matches)
    enforcer.add_function("actionMatch", action_matches)
    enforcer.add_named_domain_matching_func("g", domain_matches)
    model = enforcer.get_model()
    policies = [list(line.values) for line in lines if line.ptype == "p"]
    groupings = [list(line.values) for line in lines if line.ptype == "g"]
    if policies:
        model.add_policies("p", "p", policies)
    if groupings:
        model.add_policies("g", "g", groupings)
    enforcer.build_role_links()
    return enforcer


def _model() -> casbin.model.Model:
    model = casbin.model.Model()
    model.load_model_from_text(MODEL_TEXT)
    return model


class PolicyIndex:
    """The policy indexed by subject, answering exactly as the Casbin model above would.

    pycasbin evaluates the matcher against every policy line and expands domain
    patterns in its role manager: seconds per decision at 10,000 lines. The index walks
    only the lines of the caller's roles. tests/gateway/test_policy.py checks that it
    agrees with pycasbin's enforce() on randomized policies.
    """

    def __init__(self, lines: Iterable[PolicyLine]):
        self.bindings: dict[str, list[tuple[str, str]]] = {}
        self.rules: dict[str, list[tuple[str, str, str, str]]] = {}
        for line in lines:
            if line.ptype == "g":
                member, role, domain = line.values
                self.bindings.setdefault(member, []).append((role, domain))
            else:
                subject, domain, obj, action, effect = line.values
                self.rules.setdefault(subject, []).append((domain, obj, action, effect))

    def roles(self, subject: str, domain: str) -> list[str]:
        """The subject itself and every role it holds in `domain`, transitively."""
        seen = [subject]
        index = 0
        while index < len(seen):
            for role, binding_domain in self.bindings.get(seen[index], ()):
                if role not in seen and domain_matches(domain, binding_domain):
                    seen.append(role)
            index += 1
        return seen

    def matches(self, subject: str, domain: str, method: str, action: str) -> list[str]:
        """Every policy line that applies to this request, as Casbin lines."""
        found = []
        for role in self.roles(subject, domain):
            for rule_domain, obj, rule_action, effect in self.rules.get(role, ()):
                if domain_matches(domain, rule_domain) and action_matches(action, rule_action) and method_matches(method, obj):
                    found.append(", ".join(("p", role, rule_domain, obj, rule_action, effect)))
        return found


class Authorizer:
    """Decides calls against the current policy; safe to use from many threads."""

    def __init__(self, lines: Iterable[PolicyLine] = (), revision: int = 0):
        self._index = PolicyIndex(lines)
        self._cache: dict[tuple[str, str, str], Decision] = {}
        self._enabled = True
        self.revision = revision

    def replace(self, lines: Iterable[PolicyLine], revision: int) -> None:
        """Swap in a new policy; cached decisions of the old one are dropped with it."""
        index = PolicyIndex(lines)
        self._index, self._cache, self.revision = index, {}, revision

    def disable(self) -> None:
        """Switch enforcement off: every call is then denied (never allowed, unlike pycasbin)."""
        self._enabled = False
        self._cache = {}

    def decide(self, subject: str, domain: str, method: str) -> Decision:
        """Allow or deny `subject` calling `method` in `domain`, with the reason."""
        key = (subject, domain, method)
        cache = self._cache
        cached = cache.get(key)
        if cached is not None:
            return cached
        decision = self.explain(subject, domain, method, action_of(method))[0]
        if len(cache) >= MAX_CACHED_DECISIONS:
            cache.clear()
        cache[key] = decision
        return decision

    def explain(self, subject: str, domain: str, method: str, action: str) -> tuple[Decision, list[str], list[str]]:
        """Decision, matched policy lines and effective roles (for CheckAccess and `falaj policy test`)."""
        if not self._enabled:
            return Decision(False, "ENFORCER_UNAVAILABLE", "policy enforcement is disabled; every call is denied"), [], []
        index = self._index
        try:
            matched = index.matches(subject, domain, method, action)
            roles = index.roles(subject, domain)[1:]
        except Exception as error:  # noqa: BLE001 - a failing enforcer denies
            return Decision(False, "ENFORCER_UNAVAILABLE", f"the policy enforcer failed: {type(error).__name__}"), [], []
        if any(line.endswith(", deny") for line in matched):
            decision = Decision(False, "POLICY_DENY", f"{subject} is denied {action} on {method} in {domain}")
        elif matched:
            decision = Decision(True, "POLICY_ALLOW", f"allowed by: {matched[0]}")
        else:
            decision = Decision(False, "NO_MATCHING_POLICY", f"no policy allows {subject} to {action} {method} in {domain}")
        return decision, matched, roles


# -- the policy a new platform starts with -------------------------------------------------

BUILT_IN_ROLES = {
    "admin": "Everything, everywhere.",
    "data-engineer": "Ingest and features: read and write; read everything else.",
    "data-scientist": "Training and experiments: read and write; inference; read everything else.",
    "ml-engineer": "Training, serving, monitoring and experiments: read and write; inference; read everything else.",
    "viewer": "Read-only access to every service.",
}


def _service(name: str) -> str:
    return f"/falaj.{name}.v1.{name.capitalize()}Service/*"


INFERENCE = "/inference.GRPCInferenceService/*"
FEAST_ONLINE = "/feast.serving.ServingService/*"
SERVICES = ("ingest", "features", "training", "serving", "experiments", "monitoring")


def _reads(role: str) -> list[tuple[str, str, str, str]]:
    """Read access to every service (not the gateway's admin API: policies and audit stay with admin)."""
    return [(role, "*", _service(name), "read") for name in SERVICES]


def default_policy(admin_members: Iterable[str] = ()) -> list[PolicyLine]:
    """Built-in roles, one role per service for service-to-service calls, and admin bindings."""
    p = [
        ("admin", "*", "*", "*"),
        *_reads("viewer"),
        ("viewer", "*", INFERENCE, "read"),
        *_reads("data-engineer"),
        ("data-engineer", "*", _service("ingest"), "*"),
        ("data-engineer", "*", _service("features"), "*"),
        ("data-engineer", "*", FEAST_ONLINE, "*"),
        *_reads("data-scientist"),
        ("data-scientist", "*", _service("training"), "*"),
        ("data-scientist", "*", _service("experiments"), "*"),
        ("data-scientist", "*", INFERENCE, "*"),
        ("data-scientist", "*", FEAST_ONLINE, "*"),
        *_reads("ml-engineer"),
        ("ml-engineer", "*", _service("training"), "*"),
        ("ml-engineer", "*", _service("serving"), "*"),
        ("ml-engineer", "*", _service("monitoring"), "*"),
        ("ml-engineer", "*", _service("experiments"), "*"),
        ("ml-engineer", "*", INFERENCE, "*"),
        ("ml-engineer", "*", FEAST_ONLINE, "*"),
        # Service-to-service: exactly what each service needs from the others.
        ("service-features", "*", _service("ingest"), "read"),
        ("service-training", "*", _service("features"), "read"),
        ("service-training", "*", _service("ingest"), "read"),
        ("service-serving", "*", _service("training"), "read"),
        # batch prediction jobs read an ingest dataset version and write their output as a new one
        ("service-serving", "*", _service("ingest"), "read"),
        ("service-serving", "*", "/falaj.ingest.v1.IngestService/IngestBatches", "write"),
        ("service-serving", "*", "/falaj.features.v1.FeaturesService/GetOnlineFeatures", "read"),
        ("service-serving", "*", FEAST_ONLINE, "read"),
        ("service-serving", "*", "/falaj.monitoring.v1.MonitoringService/IngestPredictionLogs", "write"),
        ("service-serving", "*", _service("experiments"), "read"),
        ("service-serving", "*", "/falaj.experiments.v1.ExperimentsService/AssignVariant", "write"),
        ("service-serving", "*", "/falaj.experiments.v1.ExperimentsService/BatchAssignVariants", "write"),
        ("service-serving", "*", "/falaj.experiments.v1.ExperimentsService/RecordExposures", "write"),
        ("service-monitoring", "*", _service("training"), "read"),
        ("service-monitoring", "*", "/falaj.training.v1.TrainingService/CreateTrainingJob", "write"),
        ("service-monitoring", "*", _service("ingest"), "read"),
        ("service-monitoring", "*", _service("features"), "read"),
        ("service-experiments", "*", _service("serving"), "read"),
        ("service-ingest", "*", "/falaj.features.v1.FeaturesService/ApplyErasureReceipt", "write"),
        ("service-ingest", "*", "/falaj.monitoring.v1.MonitoringService/EraseSubjectData", "write"),
    ]
    p += [(f"service-{name}", "*", "/falaj.gateway.v1.GatewayAdminService/ReportAuditEvent", "write") for name in SERVICES]
    g = [(f"spiffe://falaj.local/service/{name}", f"service-{name}", "*") for name in SERVICES]
    g += [(member, "admin", "*") for member in admin_members]
    return [PolicyLine("p", (*line, "allow")) for line in p] + [PolicyLine("g", line) for line in g]
