"""Gateway benchmarks, each beside its peer in the same run.

1. Overhead: ServerLive p50/p99 through the gateway (mTLS, authorization, audit commit,
   forward) vs straight to the serving service (mTLS) - sequential calls.
2. Authorization at 10,000 policy lines: Falaj's decision vs plain pycasbin's enforce()
   on the same lines (the standard RBAC-with-domains model, keyMatch for objects).
3. Audit: durable records/s with 32 concurrent callers (group commit).

Run: .venv/bin/python bench/bench_gateway.py [--calls 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers import row, write_rows  # noqa: E402


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def bench_overhead(calls: int) -> dict[str, float]:
    import grpc

    from falaj_platform.pki import PKI
    from falaj_platform.runtime import tls
    from tests.conftest import identity
    from tests.gateway.conftest import start_platform, stop_platform

    with tempfile.TemporaryDirectory() as tmp:
        pki = PKI(Path(tmp) / "pki")
        pki.init()
        platform = start_platform(Path(tmp) / "home", pki)
        try:
            method = "/inference.GRPCInferenceService/ServerLive"
            via_gateway = platform.channel("root")
            serving_port = platform.services["serving"][0].port
            direct = grpc.secure_channel(
                f"127.0.0.1:{serving_port}",
                tls.channel_credentials(identity(pki, "service", "gateway")),
                options=[("grpc.ssl_target_name_override", "localhost")],
            )
            results = {}
            for label, channel in (("direct", direct), ("gateway", via_gateway)):
                stub = channel.unary_unary(method)
                for _ in range(200):
                    stub(b"", timeout=5)
                samples = []
                for _ in range(calls):
                    started = time.perf_counter()
                    stub(b"", timeout=5)
                    samples.append((time.perf_counter() - started) * 1000)
                results[f"{label}_p50_ms"], results[f"{label}_p99_ms"] = _percentiles(samples)
            direct.close()
            return results
        finally:
            stop_platform(platform)


STANDARD_MODEL = """
[request_definition]
r = sub, dom, obj, act
[policy_definition]
p = sub, dom, obj, act
[role_definition]
g = _, _, _
[policy_effect]
e = some(where (p.eft == allow))
[matchers]
m = g(r.sub, p.sub, r.dom) && r.dom == p.dom && keyMatch(r.obj, p.obj) && r.act == p.act
"""


def _policy(lines_count: int) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]], list[tuple[str, str, str]]]:
    rng = random.Random(7)
    tenants = [f"t{i}" for i in range(50)]
    services = ["ingest", "features", "training", "serving", "experiments", "monitoring"]
    p_lines = []
    for i in range(lines_count):
        svc = rng.choice(services)
        p_lines.append((f"role{i % 500}", rng.choice(tenants), f"/falaj.{svc}.v1.{svc.capitalize()}Service/Get{i}", "read"))
    users = [f"spiffe://falaj.local/client/u{i}" for i in range(1000)]
    g_lines = [(user, f"role{i % 500}", tenants[i % 50]) for i, user in enumerate(users)]
    requests = []
    for _ in range(2000):
        i = rng.randrange(lines_count)
        sub, dom, obj, _act = p_lines[i]
        user = rng.choice(users)
        requests.append((user, dom, obj))
    return p_lines, g_lines, requests


def bench_authorization(lines_count: int, decisions: int, casbin_decisions: int) -> dict[str, float]:
    import casbin

    from falaj_platform.gateway.policy import Authorizer, PolicyLine

    p_lines, g_lines, requests = _policy(lines_count)
    ours = Authorizer([PolicyLine("p", (*p, "allow")) for p in p_lines] + [PolicyLine("g", g) for g in g_lines])
    rng = random.Random(11)
    samples = []
    for _ in range(decisions):
        sub, dom, obj = rng.choice(requests)
        started = time.perf_counter()
        ours.decide(sub, dom, obj)
        samples.append((time.perf_counter() - started) * 1e6)
    ours_p50, ours_p99 = _percentiles(samples)

    model = casbin.model.Model()
    model.load_model_from_text(STANDARD_MODEL)
    enforcer = casbin.Enforcer(model)
    enforcer.get_model().add_policies("p", "p", [list(p) for p in p_lines])
    enforcer.get_model().add_policies("g", "g", [list(g) for g in g_lines])
    enforcer.build_role_links()
    casbin_samples = []
    for _ in range(casbin_decisions):
        sub, dom, obj = rng.choice(requests)
        started = time.perf_counter()
        enforcer.enforce(sub, dom, obj, "read")
        casbin_samples.append((time.perf_counter() - started) * 1e6)
    casbin_p50, casbin_p99 = _percentiles(casbin_samples)
    return {"falaj_p50_us": ours_p50, "falaj_p99_us": ours_p99, "pycasbin_p50_us": casbin_p50, "pycasbin_p99_us": casbin_p99}


def bench_audit(records: int, writers: int) -> dict[str, float]:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from falaj_platform.gateway.auditlog import AuditLog
    from falaj_platform.gateway.chain import AuditEntry
    from falaj_platform.gateway.server import SPEC
    from falaj_platform.gateway.store import GatewayStore
    from falaj_platform.runtime.db import Database

    with tempfile.TemporaryDirectory() as tmp:
        # The gateway's own setting: committed records survive a killed process (WAL, synchronous=NORMAL).
        database = Database(f"sqlite:///{tmp}/gateway.db", SPEC.migrations_dir, "falaj_gateway_schema_version", sqlite_synchronous="normal")
        database.upgrade()
        store = GatewayStore(database)
        log = AuditLog(store, ed25519.Ed25519PrivateKey.generate(), Path(tmp) / "anchor.json")
        per_writer = records // writers

        def write(worker: int) -> None:
            for i in range(per_writer):
                log.append(
                    AuditEntry(
                        kind="call",
                        caller="spiffe://falaj.local/client/bench",
                        domain="ae-dxb",
                        method="/inference.GRPCInferenceService/ModelInfer",
                        resource="/inference.GRPCInferenceService/ModelInfer",
                        action="predict",
                        decision="allow",
                        reason="POLICY_ALLOW",
                        detail="",
                        status_code=0,
                        request_id=f"w{worker}-{i}",
                        source_address="ipv4:127.0.0.1:5000",
                        duration_us=800,
                    )
                )

        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        log.close()
        stored = store.count_audit_records()
        database.dispose()
    return {"records": float(stored), "records_per_s": stored / elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--audit-records", type=int, default=20_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    overhead = bench_overhead(args.calls)
    authz = bench_authorization(args.lines, decisions=100_000, casbin_decisions=30)
    audit = bench_audit(args.audit_records, writers=32)
    rows = [
        (
            "gateway p50 (ServerLive)",
            f"{overhead['gateway_p50_ms']:.2f} ms",
            f"direct {overhead['direct_p50_ms']:.2f} ms",
            overhead["gateway_p50_ms"] / overhead["direct_p50_ms"],
            "overhead shown",
        ),
        (
            "gateway p99 (ServerLive)",
            f"{overhead['gateway_p99_ms']:.2f} ms",
            f"direct {overhead['direct_p99_ms']:.2f} ms",
            overhead["gateway_p99_ms"] / overhead["direct_p99_ms"],
            "overhead shown",
        ),
        (
            f"authz p99 at {args.lines} lines",
            f"{authz['falaj_p99_us']:.1f} us",
            f"pycasbin {authz['pycasbin_p99_us'] / 1000:.1f} ms",
            authz["pycasbin_p99_us"] / authz["falaj_p99_us"],
            "<= 50 us",
        ),
        (
            f"authz p50 at {args.lines} lines",
            f"{authz['falaj_p50_us']:.1f} us",
            f"pycasbin {authz['pycasbin_p50_us'] / 1000:.1f} ms",
            authz["pycasbin_p50_us"] / authz["falaj_p50_us"],
            "",
        ),
        ("audit durable records/s", f"{audit['records_per_s']:,.0f}", "goal 5,000", audit["records_per_s"] / 5000, ">= 5,000"),
    ]
    print(f"{'benchmark':<30} {'falaj':>12} {'peer / floor':>20} {'ratio':>8}  goal")
    for name, ours, peer, ratio, goal in rows:
        print(f"{name:<30} {ours:>12} {peer:>20} {ratio:>7.1f}x  {goal}")
    met = authz["falaj_p99_us"] <= 50 and audit["records_per_s"] >= 5000
    print("goals met" if met else "a goal was missed")
    write_rows(
        args.json,
        [
            row(
                "gateway overhead p50 / p99",
                f"{overhead['gateway_p50_ms']:.2f} / {overhead['gateway_p99_ms']:.2f} ms",
                f"direct {overhead['direct_p50_ms']:.2f} / {overhead['direct_p99_ms']:.2f} ms",
                overhead["direct_p50_ms"] / overhead["gateway_p50_ms"],
                "shown (no goal)",
                None,
            ),
            row(
                f"authorization p99, {args.lines:,} lines",
                f"{authz['falaj_p99_us']:.1f} us",
                f"pycasbin {authz['pycasbin_p99_us'] / 1000:.1f} ms",
                authz["pycasbin_p99_us"] / authz["falaj_p99_us"],
                "<= 50 us",
                authz["falaj_p99_us"] <= 50,
            ),
            row(
                "audit durable records/s",
                f"{audit['records_per_s']:,.0f}",
                "floor 5,000",
                audit["records_per_s"] / 5000,
                ">= 5,000",
                audit["records_per_s"] >= 5000,
            ),
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
