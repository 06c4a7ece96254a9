"""`falaj demo`: the whole flow end to end, as `make demo` runs it, twice in a row.

The end-to-end test runs the real CLI in a fresh FALAJ_HOME with every component on a
free port: PKI, the stack, ingest, features, training, approval, serving with a canary,
tritonclient traffic, an A-B experiment, drift with its alert and HTML report, erasure,
the audit chain, and the summary. The other tests pin down how the demo reports steps
that cannot run, without a stack.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from falaj.sdk import Unimplemented
from falaj_platform.demo import data as demo_data
from falaj_platform.demo.progress import FAILED, OK, SKIPPED, Progress, ServiceMissing, StepFailed
from falaj_platform.runtime.settings import COMPONENTS
from tests.backends import backend_env
from tests.conftest import free_port

SUMMARY_LINES = [
    "\nSummary\n",
    "  steps:       13/13 ran; run id ",
    "  dataset:     datasets/breast-cancer-",
    "  models:      models/breast-cancer-",
    "  deployment:  deployments/cancer-",
    "  traffic:     100 new patients, accuracy ",
    "  experiment:  experiments/cancer-ab-",
    "  drift:       alerts/",
    "  erasure:     erasureReceipts/",
    "  audit:       intact, ",
    "\nWhere to look next\n",
    "/reports/drift.html (open it in a browser)",
    "falaj audit query --decision deny --since 30",
    "README.md",
]


def _demo_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALAJ_")}
    env.update(backend_env(home))
    env["FALAJ_HOME"] = str(home)
    env["FALAJ_LOG_LEVEL"] = "info"
    env["FALAJ_RELOAD_SECONDS"] = "0.5"
    for name in COMPONENTS:
        key = "FALAJ_GATEWAY_ADDR" if name == "gateway" else f"FALAJ_{name.upper()}_ADDR"
        env[key] = f"127.0.0.1:{free_port()}"
        env[f"FALAJ_{name.upper()}_METRICS_ADDR"] = f"127.0.0.1:{free_port()}"
    return env


def _run_demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "falaj_platform.cli", "demo"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_demo_runs_end_to_end_twice_in_a_row(tmp_path: Path) -> None:
    home = tmp_path / ".falaj"
    env = _demo_env(home)
    outputs = []
    for attempt in (1, 2):
        done = _run_demo(env)
        assert done.returncode == 0, f"run {attempt}:\n{done.stdout}\n{done.stderr[-4000:]}"
        for line in SUMMARY_LINES:
            assert line in done.stdout, f"run {attempt} lacks {line!r}:\n{done.stdout}"
        assert "SKIPPED" not in done.stdout and "FAILED" not in done.stdout
        outputs.append(done.stdout)
        # the stack is stopped afterwards
        assert not any((home / "run" / f"{name}.pid").exists() for name in COMPONENTS)

    first, second = outputs
    for text in outputs:
        assert "6 quarantined" in text and "UNIQUE_KEY 1" in text and "TYPE(mean_smoothness) 1" in text
        assert "the trainer's own approval was refused (SEPARATION_OF_DUTIES)" in text
        assert "serving routed 100/100 as assigned" in text
        assert "FIRING CRITICAL" in text
        assert "4 rows left out for lack of consent" in text
    # the second run built its own resources beside the first's and retired the first's deployment
    run_ids = [t.split("run id ", 1)[1].split()[0].rstrip(";") for t in outputs]
    assert run_ids[0] != run_ids[1]
    assert "retired 1 deployment(s) of earlier demo runs" in second
    assert "issued a second identity" in first and "is still valid" in second
    report = (home / "reports" / "drift.html").read_text(encoding="utf-8")
    assert "<html" in report.lower() and run_ids[1] in report


def test_demo_data_is_the_bundled_breast_cancer_set_with_planted_bad_rows() -> None:
    data = demo_data.load(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert len(data.features) == 30 and data.features[0] == "mean_radius"
    assert data.ingested.num_rows + len(data.new_ids) == 569
    streamed_bad = data.stream[-1]
    assert streamed_bad.num_rows == len(data.bad_reasons) == 6
    schema = demo_data.schema(data.features)
    declared = [c.name for c in schema.columns]
    assert declared == ["patient_id", "subject_id", "event_time", *data.features, "malignant"]
    assert all(set(t.column_names) == set(declared) for t in data.stream)
    assert schema.data_subject_column == "subject_id" and schema.event_time_column == "event_time"
    assert data.erase_patient in streamed_bad.column("patient_id").to_pylist()  # its duplicate sits in quarantine
    shifted = demo_data.drifted(data, copies=2)
    assert shifted.shape == (2 * len(data.new_ids), 30)
    assert np.all(shifted.mean(axis=0) > data.new_x.mean(axis=0))


def test_a_step_whose_service_is_unimplemented_is_skipped_and_so_are_the_steps_that_need_it(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(total=4)

    def unimplemented() -> list[str]:
        raise ServiceMissing("training", "CreateTrainingJob", Unimplemented("Method not implemented!"))

    def broken() -> list[str]:
        raise StepFailed("deployments/x FAILED: no route can answer")

    assert progress.step("ingest", "ingest", lambda: ["469 rows"])
    assert not progress.step("train", "train", unimplemented, needs=["ingest"])
    assert not progress.step("deploy", "deploy", lambda: ["never"], needs=["train"])
    assert not progress.step("canary", "canary", broken, needs=["ingest"])
    statuses = {key: outcome.status for key, outcome in progress.outcomes.items()}
    assert statuses == {"ingest": OK, "train": SKIPPED, "deploy": SKIPPED, "canary": FAILED}
    assert not progress.all_ok
    out = capsys.readouterr().out
    assert "[2/4] train ...\n      SKIPPED" in out
    assert "the training service answers UNIMPLEMENTED to CreateTrainingJob" in out
    assert "needs step 2 (train), which did not run" in out
    assert "never" not in out
    assert progress.outcomes["deploy"].blocked and not progress.outcomes["train"].blocked


def test_unimplemented_answers_name_the_service_that_gave_them() -> None:
    from falaj_platform.demo.flow import _Tagged

    class Client:
        def CreateTrainingJob(self, request: object, **kwargs: object) -> object:
            raise Unimplemented("Method not implemented!")

        def RenderDriftReport(self, request: object, **kwargs: object) -> object:
            def chunks() -> object:
                yield b"<html>"
                raise Unimplemented("Method not implemented!")

            return chunks()

    tagged = _Tagged("training", Client())  # type: ignore[arg-type]
    with pytest.raises(ServiceMissing) as raised:
        tagged.CreateTrainingJob(object())
    assert raised.value.service == "training" and "answers UNIMPLEMENTED to CreateTrainingJob" in str(raised.value)
    stream = _Tagged("monitoring", Client()).RenderDriftReport(object())  # type: ignore[arg-type]
    assert next(stream) == b"<html>"
    with pytest.raises(ServiceMissing, match="monitoring service answers UNIMPLEMENTED to RenderDriftReport"):
        next(stream)
