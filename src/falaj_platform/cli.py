"""The `falaj` command: PKI, the local stack, single components, migrations and the demo."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from falaj_platform.runtime.errors import FalajError, StartupError
from falaj_platform.runtime.settings import COMPONENTS, GATEWAY, home_from


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


def _print_status(rows: Sequence[object]) -> None:
    print(f"{'component':<12} {'pid':>7}  {'address':<22} health")
    for row in rows:
        print(f"{row.name:<12} {row.pid or '-':>7}  {row.addr:<22} {row.health}")  # type: ignore[attr-defined]


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


def cmd_serve(args: argparse.Namespace) -> int:
    import runpy

    from falaj_platform.stack import MODULES

    sys.argv = [MODULES[args.component]]
    runpy.run_module(MODULES[args.component], run_name="__main__")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    import importlib

    from falaj_platform.runtime.db import Database
    from falaj_platform.runtime.settings import load_settings
    from falaj_platform.stack import MODULES

    settings = load_settings(args.component)
    spec = importlib.import_module(MODULES[args.component] + ".server").SPEC
    database = Database(settings.database_url, spec.migrations_dir, version_table=f"falaj_{args.component}_schema_version")
    database.upgrade()
    print(f"{args.component}: schema at {database.current_revision()}")
    database.dispose()
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

    stack = sub.add_parser("stack", help="run every service and the gateway as local processes")
    stack.add_argument("action", choices=["up", "status", "down"])
    stack.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for SERVING (up)")
    stack.set_defaults(func=cmd_stack)

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
