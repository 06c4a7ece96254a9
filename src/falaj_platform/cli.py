"""The `falaj` command: PKI, the local stack, single components, migrations and the demo."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from falaj.sdk import Falaj, connect
from falaj_platform.runtime.errors import AlreadyExists, FalajError, StartupError
from falaj_platform.runtime.settings import COMPONENTS, GATEWAY, home_from

if TYPE_CHECKING:
    from falaj_platform.stack import ComponentStatus


def _pki_root() -> Path:
    return Path(os.environ.get("FALAJ_PKI_DIR", str(home_from(os.environ) / "pki")))


def cmd_pki_init(args: argparse.Namespace) -> int:
    from falaj_platform.pki import PKI

    pki = PKI(_pki_root())
    issued = pki.init(ca_days=args.ca_days, service_days=args.service_days, client_days=args.client_days)
    print(f"PKI at {pki.root}: " + (f"issued {', '.join(issued)}" if issued else "already valid, nothing issued"))
    return 0


def cmd_pki_issue(args: argparse.Namespace) -> int:
    from falaj_platform.pki import PKI

    identity = PKI(_pki_root()).issue_client(args.name, role=args.role, days=args.days)
    print(
        f"issued {identity.spiffe_id} (role {args.role}, serial {identity.serial:x}, valid until {identity.not_after:%Y-%m-%d %H:%M} UTC)"
    )
    print(f"  cert: {identity.cert_path}\n  key:  {identity.key_path}")
    return 0


def _print_status(rows: Sequence[ComponentStatus]) -> None:
    print(f"{'component':<12} {'pid':>7}  {'address':<22} health")
    for row in rows:
        print(f"{row.name:<12} {row.pid or '-':>7}  {row.addr:<22} {row.health}")


def cmd_stack(args: argparse.Namespace) -> int:
    from falaj_platform.stack import Stack

    stack = Stack()
    if args.action == "up":
        _print_status(stack.up(timeout=args.timeout))
        print(f"stack is up; gateway at {stack.addr(GATEWAY)}, logs in {stack.home / 'logs'}")
        return 0
    if args.action == "status":
        rows = stack.status()
        _print_status(rows)
        return 0 if all(r.health == "SERVING" for r in rows) else 3
    stopped = stack.down()
    print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when COMPONENT reports SERVING over mTLS (container and probe health checks)."""
    from falaj_platform.runtime.clients import health_status
    from falaj_platform.runtime.settings import load_settings

    settings = load_settings(args.component)
    host, _, port = settings.listen_addr.rpartition(":")
    addr = f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '') else host}:{port}"
    status = health_status(addr, settings.pki, timeout=args.timeout)
    print(f"{args.component} {addr}: {status}")
    return 0 if status == "SERVING" else 1


def cmd_serve(args: argparse.Namespace) -> int:
    import runpy

    from falaj_platform.stack import MODULES

    sys.argv = [MODULES[args.component]]
    runpy.run_module(MODULES[args.component], run_name="__main__")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    import importlib

    from falaj_platform.runtime.db import Database, create_database_if_missing
    from falaj_platform.runtime.settings import load_settings
    from falaj_platform.stack import MODULES

    settings = load_settings(args.component)
    if settings.database_admin_url is not None:
        create_database_if_missing(settings.database_url, settings.database_admin_url)
    spec = importlib.import_module(MODULES[args.component] + ".server").SPEC
    database = Database(settings.database_url, spec.migrations_dir, version_table=f"falaj_{args.component}_schema_version")
    database.upgrade()
    print(f"{args.component}: schema at {database.current_revision()}")
    database.dispose()
    return 0


def _admin_client(args: argparse.Namespace) -> Falaj:
    """An SDK connection to the gateway as one of this machine's client identities."""
    from falaj_platform.runtime.settings import component_addr

    pki = _pki_root()
    folder = pki / "clients" / args.identity
    return connect(component_addr(os.environ, GATEWAY), folder / "cert.pem", folder / "key.pem", pki / "ca.pem")


def cmd_policy(args: argparse.Namespace) -> int:
    from falaj.gateway.v1 import message_pb2 as gm
    from falaj.gateway.v1 import request_response_pb2 as gr
    from falaj_platform.gateway.policy import PolicyLine

    with _admin_client(args) as falaj:
        admin = falaj.gateway
        if args.action == "list":
            print(admin.ExportPolicies(gr.ExportPoliciesRequest(domain=args.domain or "")).casbin_csv, end="")
            return 0
        if args.action == "test":
            reply = admin.CheckAccess(gr.CheckAccessRequest(subject=args.subject, domain=args.domain or "", object=args.object))
            verdict = gm.Decision.Name(reply.decision).removeprefix("DECISION_").lower()
            print(f"{verdict}: {reply.detail}")
            for line in reply.matched_policies:
                print(f"  matched: {line}")
            if reply.effective_roles:
                print(f"  roles: {', '.join(reply.effective_roles)}")
            return 0 if reply.decision == gm.DECISION_ALLOW else 1
        try:
            line = PolicyLine.parse(args.line)
        except ValueError as error:
            print(f"falaj: error: invalid policy line: {error}", file=sys.stderr)
            return 2
        if args.action == "add":
            request_id = uuid.uuid4().hex  # the SDK retries UNAVAILABLE: the retry must not add twice
            try:
                if line.ptype == "p":
                    sub, dom, obj, act, eft = line.values
                    effect = gm.POLICY_EFFECT_DENY if eft == "deny" else gm.POLICY_EFFECT_ALLOW
                    policy = gm.Policy(subject=sub, domain=dom, object=obj, action=act, effect=effect)
                    admin.CreatePolicy(gr.CreatePolicyRequest(policy=policy, request_id=request_id))
                else:
                    member, role, dom = line.values
                    binding = gm.RoleBinding(member=member, role=role, domain=dom)
                    admin.CreateRoleBinding(gr.CreateRoleBindingRequest(binding=binding, request_id=request_id))
            except AlreadyExists:
                print(f"already present: {line.csv()}")
                return 0
            print(f"added: {line.csv()}")
            return 0
        from falaj_platform.gateway.api import line_id

        if line.ptype == "p":
            admin.DeletePolicy(gr.DeletePolicyRequest(name=f"policies/{line_id(line)}"))
        else:
            admin.DeleteRoleBinding(gr.DeleteRoleBindingRequest(name=f"roleBindings/{line_id(line)}"))
        print(f"removed: {line.csv()}")
        return 0


def cmd_audit(args: argparse.Namespace) -> int:
    import datetime as dt

    from falaj.gateway.v1 import message_pb2 as gm
    from falaj.gateway.v1 import request_response_pb2 as gr

    with _admin_client(args) as falaj:
        admin = falaj.gateway
        if args.action == "verify":
            reply = admin.VerifyAuditChain(gr.VerifyAuditChainRequest())
            if reply.intact:
                print(
                    f"audit chain intact: {reply.records_checked} records, {reply.checkpoints_checked} signed checkpoints, head {reply.head_sequence}"
                )
                return 0
            kind = gm.ChainBreakKind.Name(reply.first_break.kind).removeprefix("CHAIN_BREAK_KIND_")
            print(f"audit chain BROKEN at record {reply.first_break.sequence} ({kind}): {reply.first_break.detail}")
            return 1
        flt = gm.AuditRecordFilter(caller=args.caller or "", method=args.method or "")
        if args.decision:
            flt.decision = gm.DECISION_ALLOW if args.decision == "allow" else gm.DECISION_DENY
        if args.since:
            flt.start_time.FromDatetime(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=args.since))
        reply = admin.QueryAuditRecords(gr.QueryAuditRecordsRequest(filter=flt, page_size=args.limit, newest_first=True))
        for record in reply.records:
            decision = gm.Decision.Name(record.decision).removeprefix("DECISION_").lower()
            what = record.method or f"{gm.SecurityEventType.Name(record.event_type).removeprefix('SECURITY_EVENT_TYPE_')} {record.resource}"
            when = record.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
            print(f"{record.sequence:>8} {when} {decision:<5} {record.caller} {what} {record.decision_detail}")
        return 0


def cmd_pki_revoke(args: argparse.Namespace) -> int:
    import json

    from falaj.gateway.v1 import message_pb2 as gm
    from falaj.gateway.v1 import request_response_pb2 as gr

    info_path = _pki_root() / "clients" / args.name / "identity.json"
    try:
        info = json.loads(info_path.read_text())
    except FileNotFoundError:
        print(f"falaj: error: no client identity {args.name!r} under {_pki_root()}", file=sys.stderr)
        return 2
    serial = format(int(info["serial"]), "x")
    with _admin_client(args) as falaj:
        falaj.gateway.CreateRevocation(
            gr.CreateRevocationRequest(revocation=gm.Revocation(serial_number=serial, subject=info["spiffe_id"], note=args.note or ""))
        )
    print(f"revoked {info['spiffe_id']} (serial {serial})")
    return 0


def cmd_features_apply(args: argparse.Namespace) -> int:
    from falaj_platform.services.features.definitions import DefinitionFileError, build_apply_request, describe_changes

    try:
        request = build_apply_request(args.file, prune=args.prune, validate_only=args.dry_run)
    except DefinitionFileError as error:
        print(f"falaj: error: {error}", file=sys.stderr)
        return 2
    with _admin_client(args) as falaj:
        response = falaj.features.ApplyFeatureDefinitions(request, timeout=120)
    for line in describe_changes(response):
        print(line)
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    import hashlib

    from falaj.common.v1 import common_pb2
    from falaj.training.v1 import message_pb2 as tm
    from falaj.training.v1 import request_response_pb2 as tr

    try:
        content = Path(args.file).read_bytes()
    except OSError as error:
        print(f"falaj: error: cannot read {args.file}: {error.strerror}", file=sys.stderr)
        return 2
    task = tm.TaskType.Value("TASK_TYPE_" + args.task.upper().replace("-", "_"))
    header = tr.ImportModelVersionHeader(
        registered_model=f"models/{args.name}",
        residency=common_pb2.Residency(region=args.region),
        task=task,
        description=args.description,
        expected_sha256=hashlib.sha256(content).hexdigest(),
        expected_size_bytes=len(content),
        import_source=str(Path(args.file).resolve()),
    )
    chunk = 1024 * 1024
    requests = [tr.ImportModelVersionRequest(header=header)]
    requests += [tr.ImportModelVersionRequest(chunk=content[i : i + chunk]) for i in range(0, len(content), chunk)]
    with _admin_client(args) as falaj:
        version = falaj.training.ImportModelVersion(iter(requests), timeout=300).model_version
    print(f"registered {version.name} ({len(content):,} bytes, sha256 {header.expected_sha256[:12]}...)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from falaj_platform.demo import run_demo

    return run_demo(keep_running=args.keep_running)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="falaj", description="Falaj: an enterprise ML platform on gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)

    pki = sub.add_parser("pki", help="the platform CA and identities").add_subparsers(dest="pki_command", required=True)
    init = pki.add_parser("init", help="create the CA, service and gateway certificates, and the admin client")
    init.add_argument("--ca-days", type=int, default=365)
    init.add_argument("--service-days", type=int, default=7)
    init.add_argument("--client-days", type=int, default=7)
    init.set_defaults(func=cmd_pki_init)
    issue = pki.add_parser("issue", help="issue a client identity spiffe://falaj.local/client/NAME")
    issue.add_argument("name")
    issue.add_argument("--role", required=True)
    issue.add_argument("--days", type=int, default=7)
    issue.set_defaults(func=cmd_pki_issue)

    revoke = pki.add_parser("revoke", help="revoke a client identity at the gateway (takes effect at once)")
    revoke.add_argument("name")
    revoke.add_argument("--note", default="")
    revoke.add_argument("--identity", default="admin", help="client identity to call the gateway with")
    revoke.set_defaults(func=cmd_pki_revoke)

    policy = sub.add_parser("policy", help="the gateway's Casbin policy (deny by default)")
    policy.add_argument("action", choices=["list", "add", "remove", "test"])
    policy.add_argument(
        "line", nargs="?", default="", help="add/remove: 'p, SUBJECT, DOMAIN, OBJECT, ACTION[, allow|deny]' or 'g, MEMBER, ROLE, DOMAIN'"
    )
    policy.add_argument("--subject", default="", help="test: SPIFFE ID or role")
    policy.add_argument("--object", default="", help="test: full gRPC method")
    policy.add_argument("--domain", default="", help="test/list: tenant or region")
    policy.add_argument("--identity", default="admin", help="client identity to call the gateway with")
    policy.set_defaults(func=cmd_policy)

    audit = sub.add_parser("audit", help="the shared, hash-chained audit log")
    audit.add_argument("action", choices=["verify", "query"])
    audit.add_argument("--caller", default="")
    audit.add_argument("--method", default="")
    audit.add_argument("--decision", choices=["allow", "deny"])
    audit.add_argument("--since", type=float, help="only the last N minutes")
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--identity", default="admin", help="client identity to call the gateway with")
    audit.set_defaults(func=cmd_audit)

    features = sub.add_parser("features", help="feature definitions").add_subparsers(dest="features_command", required=True)
    apply = features.add_parser("apply", help="make the feature registry match a YAML/JSON definition file")
    apply.add_argument("file", type=Path)
    apply.add_argument("--prune", action="store_true", help="also delete your definitions the file leaves out")
    apply.add_argument("--dry-run", action="store_true", help="print the plan without changing anything")
    apply.add_argument("--identity", default="admin", help="client identity to call the gateway with")
    apply.set_defaults(func=cmd_features_apply)

    models = sub.add_parser("models", help="the model registry").add_subparsers(dest="models_command", required=True)
    model_import = models.add_parser("import", help="register an externally built ONNX model as a new version")
    model_import.add_argument("name", help="registered model name (created when new)")
    model_import.add_argument("file", type=Path, help="the .onnx file")
    model_import.add_argument(
        "--task", choices=["binary-classification", "multiclass-classification", "regression"], default="binary-classification"
    )
    model_import.add_argument("--region", default="ae-dxb", help="residency region of the model")
    model_import.add_argument("--description", default="")
    model_import.add_argument("--identity", default="admin", help="client identity to call the gateway with")
    model_import.set_defaults(func=cmd_models_import)

    stack = sub.add_parser("stack", help="run every service and the gateway as local processes")
    stack.add_argument("action", choices=["up", "status", "down"])
    stack.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for SERVING (up)")
    stack.set_defaults(func=cmd_stack)

    health = sub.add_parser("health", help="check one component's gRPC health over mTLS with its own identity")
    health.add_argument("component", choices=COMPONENTS)
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(func=cmd_health)

    serve = sub.add_parser("serve", help="run one component in the foreground")
    serve.add_argument("component", choices=COMPONENTS)
    serve.set_defaults(func=cmd_serve)

    db = sub.add_parser("db", help="database migrations").add_subparsers(dest="db_command", required=True)
    upgrade = db.add_parser("upgrade", help="migrate a component's database to the latest schema")
    upgrade.add_argument("component", choices=COMPONENTS)
    upgrade.set_defaults(func=cmd_db_upgrade)

    demo = sub.add_parser("demo", help="run the platform end to end on the embedded default")
    demo.add_argument("--keep-running", action="store_true", help="leave the stack up afterwards")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (StartupError, FalajError) as error:
        print(f"falaj: error: {getattr(error, 'message', error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
