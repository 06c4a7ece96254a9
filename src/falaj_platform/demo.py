"""`falaj demo`: bring the platform up on the embedded default and prove every hop works.

This is the foundation's demo: PKI, the stack, mTLS health of every service, and the
Open Inference Protocol through the gateway with a stock client (tritonclient).
The service issues extend it into the full ingest -> train -> serve -> monitor flow.
"""

from __future__ import annotations

import time

from falaj_platform.runtime.settings import COMPONENTS, GATEWAY
from falaj_platform.stack import Stack


def _step(number: int, total: int, text: str) -> float:
    print(f"[{number}/{total}] {text} ...", flush=True)
    return time.perf_counter()


def _done(started: float, detail: str = "") -> None:
    print(f"      ok ({time.perf_counter() - started:.1f}s){' - ' + detail if detail else ''}", flush=True)


def run_demo(*, keep_running: bool = False) -> int:
    import tritonclient.grpc as triton

    stack = Stack()
    total = 4
    started = _step(1, total, f"PKI under {stack.pki.root}")
    issued = stack.pki.init()
    _done(started, f"issued {', '.join(issued)}" if issued else "existing certificates still valid")

    started = _step(2, total, "starting the stack (six services + gateway), health-gated")
    rows = stack.up()
    _done(started, ", ".join(f"{r.name}={r.health}" for r in rows))

    started = _step(3, total, "Open Inference Protocol through the gateway with tritonclient over mTLS")
    client = triton.InferenceServerClient(
        url=stack.addr(GATEWAY),
        ssl=True,
        root_certificates=str(stack.admin.ca_cert),
        private_key=str(stack.admin.key),
        certificate_chain=str(stack.admin.cert),
        channel_args=[("grpc.ssl_target_name_override", "localhost")],
    )
    live, ready = client.is_server_live(), client.is_server_ready()
    metadata = client.get_server_metadata()
    client.close()
    if not (live and ready):
        print(f"      serving is not live/ready (live={live}, ready={ready})")
        return 1
    _done(started, f"server {metadata.name} {metadata.version}: live and ready")

    if keep_running:
        print(f"[4/{total}] leaving the stack up: `falaj stack status`, `falaj stack down`; logs in {stack.home / 'logs'}")
    else:
        started = _step(4, total, "stopping the stack")
        stack.down()
        _done(started)
    print(
        f"\nAll {len(COMPONENTS)} components served over mTLS. Next: README.md, `falaj stack up`, and the SDK (`from falaj.sdk import connect`)."
    )
    return 0
