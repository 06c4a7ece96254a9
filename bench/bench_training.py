"""Training benchmark: a Falaj job's training vs a plain torch loop, same data, same run.

The job runs in the real training service (worker process, progress reports, lease
heartbeats, validation after each epoch), reading its data from a Parquet file. The
plain loop is the textbook loop on the same training rows: same architecture, optimizer,
batch size, epochs, thread count and shuffling, no validation and no reporting.

Printed:
- training overhead = the job's training phase (first to last epoch, as the worker
  reported it) / the plain loop; the goal is <= 1.10x;
- job wall time (submit to SUCCEEDED: data, worker hand-off, training, evaluation, ONNX
  export, parity, encryption, registration) / the plain loop, for context.

`--worker-only` runs the job's worker process directly (the same training code, without
the service around it: no gRPC, database or gateway), for machines that have torch but
not the service's dependencies.

Run: .venv/bin/python bench/bench_training.py [--rows 200000] [--epochs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers import row, write_rows  # noqa: E402

FEATURES = 32
HIDDEN = (128, 64)
BATCH = 256
LEARNING_RATE = 1e-3
SEED = 13


def make_table(rows: int):  # type: ignore[no-untyped-def]
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(rows, FEATURES)).astype(np.float64)
    weights = rng.normal(size=FEATURES)
    score = x @ weights + 0.5 * np.sin(3 * x[:, 0]) + rng.normal(scale=0.5, size=rows)
    columns = {f"f__x{i}": x[:, i] for i in range(FEATURES)}
    columns["label"] = (score > 0).astype(np.int64)
    return pa.table(columns)


def plain_loop_seconds(table, train_rows: list[int], epochs: int, threads: int) -> float:  # type: ignore[no-untyped-def]
    """The textbook torch loop on the job's training rows."""
    import numpy as np
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    x_all = np.column_stack([table.column(f"f__x{i}").to_numpy() for i in range(FEATURES)])
    x = torch.from_numpy(x_all[train_rows]).float()
    y = torch.from_numpy(table.column("label").to_numpy()[train_rows]).float()
    layers: list[nn.Module] = []
    width = FEATURES
    for size in HIDDEN:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    model = nn.Sequential(*layers, nn.Linear(width, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_of = nn.BCEWithLogitsLoss()
    started = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for begin in range(0, len(order), BATCH):
            batch = order[begin : begin + BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(model(x[batch]).reshape(-1), y[batch])
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def job_spec(epochs: int, threads: int):  # type: ignore[no-untyped-def]
    from falaj.training.v1 import message_pb2 as pb

    return pb.TrainingJobSpec(
        data=pb.TrainingDataSpec(
            feature_list=pb.FeatureList(references=[f"f:x{i}" for i in range(FEATURES)]),
            entities=pb.EntityFrame(dataset_version="datasets/bench/versions/1"),
            label_column="label",
        ),
        task=pb.TASK_TYPE_BINARY_CLASSIFICATION,
        model=pb.ModelSpec(family=pb.MODEL_FAMILY_MLP, mlp=pb.MlpConfig(hidden_sizes=HIDDEN)),
        hyperparameters=pb.Hyperparameters(learning_rate=LEARNING_RATE, epochs=epochs, batch_size=BATCH),
        seed=SEED,
        resources=pb.ResourceSpec(cpu_threads_per_process=threads),
        registration=pb.RegistrationSpec(registered_model="models/bench"),
    )


def run_job(service, spec) -> tuple[float, float, object]:  # type: ignore[no-untyped-def]
    """(job wall seconds, training-phase seconds, job)."""
    from falaj.training.v1 import message_pb2 as pb
    from falaj.training.v1 import request_response_pb2 as rr
    from tests.conftest import caller

    started = time.perf_counter()
    name = service.stub.CreateTrainingJob(
        rr.CreateTrainingJobRequest(training_job=pb.TrainingJob(spec=spec)), metadata=caller("alice")
    ).training_job.name
    # Follow the progress stream to the end (no polling beside the training).
    events = list(service.stub.StreamTrainingJobProgress(rr.StreamTrainingJobProgressRequest(name=name), metadata=caller("alice")))
    wall = time.perf_counter() - started
    job = service.stub.GetTrainingJob(rr.GetTrainingJobRequest(name=name), metadata=caller("alice")).training_job
    if job.state != pb.TRAINING_JOB_STATE_SUCCEEDED:
        raise SystemExit(f"the benchmark job did not succeed: {job.failure.message}")
    training_start = next(e.progress.time for e in events if e.progress.phase == pb.TRAINING_PHASE_TRAINING and not e.progress.epoch)
    last_epoch = [e.progress.time for e in events if e.progress.epoch][-1]
    return wall, (last_epoch.ToNanoseconds() - training_start.ToNanoseconds()) / 1e9, job


def worker_plan(epochs: int, threads: int):  # type: ignore[no-untyped-def]
    """The plan the service resolves from `job_spec` (same defaults)."""
    from falaj_platform.services.training.plan import JobPlan

    return JobPlan(
        job_id="bench",
        task="BINARY_CLASSIFICATION",
        family="MLP",
        hidden_sizes=HIDDEN,
        learning_rate=LEARNING_RATE,
        epochs=epochs,
        batch_size=BATCH,
        seed=SEED,
        cpu_threads=threads,
        feature_references=tuple(f"f:x{i}" for i in range(FEATURES)),
        label_column="label",
        gate_metric="roc_auc",
    )


def run_worker(table, work: Path, epochs: int, threads: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(worker process wall seconds, training-phase seconds) of one job run by the worker process."""
    import datetime as dt
    import os
    import subprocess

    import pyarrow as pa
    import pyarrow.ipc

    from falaj_platform.services.training.plan import EVENT_PREFIX

    work.mkdir(parents=True, exist_ok=True)
    renamed = pa.table({(f"f:x{name[4:]}" if name.startswith("f__x") else name): table.column(name) for name in table.column_names})
    with pa.OSFile(str(work / "data.arrow"), "wb") as sink, pyarrow.ipc.new_file(sink, renamed.schema) as writer:
        writer.write_table(renamed)
    (work / "plan.json").write_text(worker_plan(epochs, threads).to_json())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "sdk" / "src"), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "falaj_platform.services.training.worker", "--job-dir", str(work)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    wall = time.perf_counter() - started
    events = [json.loads(line[len(EVENT_PREFIX) :]) for line in done.stdout.splitlines() if line.startswith(EVENT_PREFIX)]
    if done.returncode != 0 or events[-1]["type"] != "result":
        raise SystemExit(f"the worker failed: {events[-1] if events else done.stderr[-2000:]}")
    reports = [event["progress"] for event in events if event["type"] == "progress"]
    when = [dt.datetime.fromisoformat(report["time"].replace("Z", "+00:00")) for report in reports]
    start = next(
        t for report, t in zip(reports, when, strict=True) if report["phase"] == "TRAINING_PHASE_TRAINING" and not report.get("epoch")
    )
    end = [t for report, t in zip(reports, when, strict=True) if report.get("epoch")][-1]
    return wall, (end - start).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker-only", action="store_true", help="run the worker process without the service around it")
    args = parser.parse_args()
    if args.worker_only:
        worker_only(args)
        return

    import pyarrow.parquet as pq

    from falaj_platform.pki import PKI
    from falaj_platform.runtime.logs import configure_logging
    from falaj_platform.services.training.config import TrainingConfig
    from falaj_platform.services.training.plan import JobPlan
    from falaj_platform.services.training.worker import split_rows
    from tests.training.conftest import start_training_service

    configure_logging("bench", "warning")
    table = make_table(args.rows)
    plan = JobPlan(job_id="bench", task="BINARY_CLASSIFICATION", family="MLP", seed=SEED)
    train_rows = sorted(split_rows(plan, args.rows, table.column("label").to_numpy(), None)[0].tolist())
    with tempfile.TemporaryDirectory() as tmp:
        pki = PKI(Path(tmp) / "pki")
        pki.init()
        service = start_training_service(Path(tmp), pki, TrainingConfig(prewarm_workers=1))
        try:
            (service.data_root / "bench").mkdir(parents=True)
            pq.write_table(table, service.data_root / "bench" / "1.parquet")
            run_job(service, job_spec(1, args.threads))  # warm-up: the next job gets a loaded worker
            plain_loop_seconds(table, train_rows, 1, args.threads)  # warm-up: torch's first-call costs
            time.sleep(8.0)  # let the replacement worker finish loading before the measured runs
            plain, walls, trainings = [], [], []
            for _ in range(args.repeats):
                plain.append(plain_loop_seconds(table, train_rows, args.epochs, args.threads))
                wall, training, job = run_job(service, job_spec(args.epochs, args.threads))
                walls.append(wall)
                trainings.append(training)
                time.sleep(8.0)
        finally:
            service.close()
    plain_s, wall_s, training_s = statistics.median(plain), statistics.median(walls), statistics.median(trainings)
    print(
        f"training: {args.rows} rows ({len(train_rows)} trained), {FEATURES} features, MLP {list(HIDDEN)}, "
        f"batch {BATCH}, {args.epochs} epochs, {args.threads} thread(s), median of {args.repeats}"
    )
    print(f"  plain torch loop             {plain_s:8.3f} s   runs {[round(v, 3) for v in plain]}")
    print(
        f"  Falaj job, training phase    {training_s:8.3f} s   overhead ratio {training_s / plain_s:.3f}x (goal <= 1.10x); "
        f"best-of ratio {min(trainings) / min(plain):.3f}x; runs {[round(v, 3) for v in trainings]}"
    )
    print(
        f"  Falaj job, submit->SUCCEEDED {wall_s:8.3f} s   ratio {wall_s / plain_s:.3f}x (includes evaluation, export, parity, registration)"
    )
    write_rows(
        args.json,
        [
            row(
                f"training overhead, MLP {args.epochs} epochs",
                f"{training_s:.2f} s (best-of {min(trainings) / min(plain):.2f}x)",
                f"plain torch loop {plain_s:.2f} s",
                plain_s / training_s,
                "job <= 1.10x the loop",
                training_s / plain_s <= 1.10,
            )
        ],
    )


def worker_only(args: argparse.Namespace) -> None:
    from falaj_platform.services.training.worker import split_rows

    table = make_table(args.rows)
    train_rows = sorted(split_rows(worker_plan(args.epochs, args.threads), args.rows, table.column("label").to_numpy(), None)[0].tolist())
    plain_loop_seconds(table, train_rows, 1, args.threads)  # warm-up: torch's first-call costs
    plain, walls, trainings = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            plain.append(plain_loop_seconds(table, train_rows, args.epochs, args.threads))
            wall, training = run_worker(table, Path(tmp) / f"job-{repeat}", args.epochs, args.threads)
            walls.append(wall)
            trainings.append(training)
    plain_s, training_s, wall_s = statistics.median(plain), statistics.median(trainings), statistics.median(walls)
    print(
        f"training (worker only): {args.rows} rows ({len(train_rows)} trained), {FEATURES} features, MLP {list(HIDDEN)}, "
        f"batch {BATCH}, {args.epochs} epochs, {args.threads} thread(s), median of {args.repeats}"
    )
    print(f"  plain torch loop             {plain_s:8.3f} s   runs {[round(v, 3) for v in plain]}")
    print(
        f"  worker, training phase       {training_s:8.3f} s   overhead ratio {training_s / plain_s:.3f}x (goal <= 1.10x); "
        f"best-of ratio {min(trainings) / min(plain):.3f}x; runs {[round(v, 3) for v in trainings]}"
    )
    print(
        f"  worker process wall          {wall_s:8.3f} s   (cold interpreter and torch import included; the service keeps workers loaded)"
    )
    if args.json:
        args.json.write_text(json.dumps({"plain_loop_s": plain_s, "job_training_s": training_s, "ratio": training_s / plain_s}, indent=2))


if __name__ == "__main__":
    main()
