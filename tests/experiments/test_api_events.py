"""Assignment and events through the real service: assignments match the cached configuration,
event batches are counted once, and events of an experiment that is not running are refused."""

from __future__ import annotations

import datetime as dt
import io

import grpc
import pyarrow as pa
import pyarrow.ipc
from google.protobuf import field_mask_pb2

from falaj.common.v1 import common_pb2
from falaj.experiments.v1 import message_pb2 as pb
from falaj.experiments.v1 import request_response_pb2 as rr
from falaj_platform.services.experiments.assignment import bucket_of
from tests.experiments.conftest import ExperimentsClient, create_running, design, error_of

NAME = "experiments/checkout"


def local_variant(config: pb.AssignmentConfig, unit_id: str) -> str:
    """What serving does with a cached AssignmentConfig: hash, then look the bucket up."""
    control = next(v.variant_id for v in config.variants if v.control)
    if config.state != pb.EXPERIMENT_STATE_RUNNING:
        return control
    bucket = bucket_of(config.hashing.salt, unit_id)
    return next((r.variant_id for r in config.bucket_ranges if r.start_bucket <= bucket < r.end_bucket), control)


def test_assignments_are_stable_and_equal_a_local_evaluation_of_the_cached_config(experiments: ExperimentsClient) -> None:
    experiments.CreateExperiment(rr.CreateExperimentRequest(experiment_id="checkout", experiment=design()))
    draft = experiments.AssignVariant(rr.AssignVariantRequest(experiment=NAME, unit_id="user-1")).assignment
    assert (draft.variant_id, draft.in_experiment, draft.reason) == ("control", False, pb.ASSIGNMENT_REASON_NOT_RUNNING)

    running = experiments.StartExperiment(rr.StartExperimentRequest(name=NAME)).experiment
    config = experiments.GetAssignmentConfig(rr.GetAssignmentConfigRequest(experiment=NAME)).config
    assert config.config_revision == running.config_revision
    assert experiments.GetAssignmentConfig(
        rr.GetAssignmentConfigRequest(experiment=NAME, known_config_revision=config.config_revision)
    ).not_modified

    units = [rr.AssignmentUnit(unit_id=f"user-{i}") for i in range(2_000)]
    batch = experiments.BatchAssignVariants(rr.BatchAssignVariantsRequest(experiment=NAME, units=units)).assignments
    again = experiments.BatchAssignVariants(rr.BatchAssignVariantsRequest(experiment=NAME, units=units)).assignments
    assert [a.variant_id for a in batch] == [a.variant_id for a in again]
    assert [a.variant_id for a in batch] == [local_variant(config, u.unit_id) for u in units]
    assert {a.variant_id for a in batch} == {"control", "treatment"}
    one = experiments.AssignVariant(rr.AssignVariantRequest(experiment=NAME, unit_id="user-7")).assignment
    assert one == batch[7]
    assert one.deployment == f"deployments/checkout-{one.variant_id}" and one.in_experiment

    experiments.StopExperiment(rr.StopExperimentRequest(name=NAME))
    stale = experiments.GetAssignmentConfig(rr.GetAssignmentConfigRequest(experiment=NAME, known_config_revision=config.config_revision))
    assert not stale.not_modified and stale.config.state == pb.EXPERIMENT_STATE_STOPPED
    stopped = experiments.BatchAssignVariants(rr.BatchAssignVariantsRequest(experiment=NAME, units=units[:50])).assignments
    assert {a.variant_id for a in stopped} == {"control"}


def test_a_running_allocation_change_moves_few_units_and_refreshes_caches(experiments: ExperimentsClient) -> None:
    running = create_running(experiments, "checkout")
    units = [rr.AssignmentUnit(unit_id=f"user-{i}") for i in range(10_000)]
    before = [
        a.variant_id for a in experiments.BatchAssignVariants(rr.BatchAssignVariantsRequest(experiment=NAME, units=units)).assignments
    ]
    updated = experiments.UpdateExperiment(
        rr.UpdateExperimentRequest(
            experiment=pb.Experiment(
                name=NAME,
                allocation=pb.Allocation(
                    coverage_bps=10_000,
                    weights=[
                        pb.VariantWeight(variant_id="control", weight_bps=8000),
                        pb.VariantWeight(variant_id="treatment", weight_bps=2000),
                    ],
                ),
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["allocation"]),
            reason="ramp down",
        )
    ).experiment
    assert updated.config_revision == running.config_revision + 1
    after = [a.variant_id for a in experiments.BatchAssignVariants(rr.BatchAssignVariantsRequest(experiment=NAME, units=units)).assignments]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert {pair for pair in moved} == {("treatment", "control")}
    assert 0.27 < len(moved) / len(units) < 0.33  # exactly the 30% that had to move
    assert experiments.audit.events[-1]["action"] == "update" and experiments.audit.events[-1]["detail"] == "ramp down"

    code, reason, _ = error_of(
        lambda: experiments.UpdateExperiment(
            rr.UpdateExperimentRequest(
                experiment=pb.Experiment(
                    name=NAME, allocation=pb.Allocation(weights=[pb.VariantWeight(variant_id="control", weight_bps=9000)])
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["allocation"]),
            )
        )
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "ALLOCATION_NOT_100_PERCENT")


def test_targeting_through_the_api(experiments: ExperimentsClient) -> None:
    targeting = pb.Targeting(
        any_of=[
            pb.TargetingClause(
                all_of=[
                    pb.AttributeCondition(
                        attribute="country", operator=pb.CONDITION_OPERATOR_IN, values=[pb.AttributeValue(string_value="AE")]
                    )
                ]
            )
        ]
    )
    create_running(experiments, "checkout", design(targeting=targeting))
    emirati = experiments.AssignVariant(
        rr.AssignVariantRequest(experiment=NAME, unit_id="user-1", attributes={"country": pb.AttributeValue(string_value="AE")})
    ).assignment
    assert emirati.in_experiment and emirati.reason == pb.ASSIGNMENT_REASON_ASSIGNED
    other = experiments.AssignVariant(
        rr.AssignVariantRequest(experiment=NAME, unit_id="user-1", attributes={"country": pb.AttributeValue(string_value="FR")})
    ).assignment
    assert (other.variant_id, other.reason) == ("control", pb.ASSIGNMENT_REASON_NOT_TARGETED)


def exposures_for(experiments: ExperimentsClient, units: range) -> list[pb.Exposure]:
    assigned = experiments.BatchAssignVariants(
        rr.BatchAssignVariantsRequest(experiment=NAME, units=[rr.AssignmentUnit(unit_id=f"user-{i}") for i in units])
    ).assignments
    return [pb.Exposure(event_id=f"exp-{a.unit_id}", unit_id=a.unit_id, variant_id=a.variant_id, source="serving") for a in assigned]


def test_event_batches_are_counted_once(experiments: ExperimentsClient) -> None:
    create_running(experiments, "checkout")
    batch = exposures_for(experiments, range(100))
    request = rr.RecordExposuresRequest(experiment=NAME, request_id="batch-1", exposures=batch)
    first = experiments.RecordExposures(request)
    assert (first.accepted_count, first.duplicate_count, list(first.rejections)) == (100, 0, [])
    # The same batch retried with the same request id: the first answer, nothing counted again.
    assert experiments.RecordExposures(request) == first
    # The same events under a new request id (a client replaying by hand): all duplicates.
    replay = experiments.RecordExposures(rr.RecordExposuresRequest(experiment=NAME, request_id="batch-2", exposures=batch))
    assert (replay.accepted_count, replay.duplicate_count) == (0, 100)
    # A request id reused for another body is refused and changes nothing.
    code, reason, _ = error_of(
        lambda: experiments.RecordExposures(rr.RecordExposuresRequest(experiment=NAME, request_id="batch-1", exposures=batch[:10]))
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ID_REUSED")
    counted = experiments.api.store.count_exposed_units("checkout")
    assert sum(counted.values()) == 100

    outcomes = [pb.Outcome(event_id=f"rev-{i}", unit_id=f"user-{i}", metric_id="revenue", value=10.0 + i) for i in range(50)]
    outcomes += [pb.Outcome(event_id="rev-0", unit_id="user-0", metric_id="revenue", value=99.0)]  # duplicate inside the batch
    recorded = experiments.RecordOutcomes(rr.RecordOutcomesRequest(experiment=NAME, request_id="outcomes-1", outcomes=outcomes))
    assert (recorded.accepted_count, recorded.duplicate_count) == (50, 1)


def test_bad_events_are_rejected_one_by_one_and_the_rest_counted(experiments: ExperimentsClient) -> None:
    create_running(experiments, "checkout")
    good = exposures_for(experiments, range(3))
    wrong_variant = "treatment" if good[0].variant_id == "control" else "control"
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    exposures = [
        *good,
        pb.Exposure(event_id="x1", unit_id=good[0].unit_id, variant_id=wrong_variant),
        pb.Exposure(event_id="x2", unit_id="user-9", variant_id="ghost"),
        pb.Exposure(event_id="", unit_id="user-9", variant_id="control"),
    ]
    exposures.append(pb.Exposure(event_id="x3", unit_id=good[1].unit_id, variant_id=good[1].variant_id))
    exposures[-1].time.FromDatetime(future)
    response = experiments.RecordExposures(rr.RecordExposuresRequest(experiment=NAME, request_id="mixed", exposures=exposures))
    assert response.accepted_count == 3
    assert [(r.index, r.reason) for r in response.rejections] == [
        (3, "VARIANT_MISMATCH"),
        (4, "UNKNOWN_VARIANT"),
        (5, "INVALID_EVENT_ID"),
        (6, "FUTURE_TIME"),
    ]
    outcomes = [
        pb.Outcome(event_id="o1", unit_id="user-1", metric_id="nope", value=1),
        pb.Outcome(event_id="o2", unit_id="user-1", metric_id="converted", value=0.5),
        pb.Outcome(event_id="o3", unit_id="user-1", metric_id="revenue", value=float("nan")),
        pb.Outcome(event_id="o4", unit_id="user-1", metric_id="converted", value=1),
    ]
    recorded = experiments.RecordOutcomes(rr.RecordOutcomesRequest(experiment=NAME, request_id="o", outcomes=outcomes))
    assert recorded.accepted_count == 1
    assert [r.reason for r in recorded.rejections] == ["UNKNOWN_METRIC", "INVALID_VALUE", "INVALID_VALUE"]


def test_event_batches_need_a_request_id_a_running_experiment_and_a_bounded_size(experiments: ExperimentsClient) -> None:
    create_running(experiments, "checkout")
    code, reason, _ = error_of(
        lambda: experiments.RecordExposures(rr.RecordExposuresRequest(experiment=NAME, exposures=[pb.Exposure(event_id="e", unit_id="u")]))
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REQUIRED")
    too_many = [pb.Outcome(event_id=f"e{i}", unit_id="u", metric_id="revenue", value=1) for i in range(10_001)]
    code, reason, _ = error_of(
        lambda: experiments.RecordOutcomes(rr.RecordOutcomesRequest(experiment=NAME, request_id="big", outcomes=too_many))
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE")
    batch = exposures_for(experiments, range(5))
    experiments.RecordExposures(rr.RecordExposuresRequest(experiment=NAME, request_id="before-stop", exposures=batch))
    experiments.StopExperiment(rr.StopExperimentRequest(name=NAME))
    code, reason, message = error_of(
        lambda: experiments.RecordExposures(rr.RecordExposuresRequest(experiment=NAME, request_id="after-stop", exposures=batch))
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "EXPERIMENT_NOT_RUNNING")
    assert "STOPPED" in message
    # A retry of a batch counted before the stop still gets its first answer.
    assert (
        experiments.RecordExposures(rr.RecordExposuresRequest(experiment=NAME, request_id="before-stop", exposures=batch)).accepted_count
        == 5
    )
    assert sum(experiments.api.store.count_exposed_units("checkout").values()) == 5


def arrow_batch(columns: dict[str, pa.Array], batch_id: str) -> common_pb2.ArrowBatch:
    table = pa.table(columns)
    sink = io.BytesIO()
    with pyarrow.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return common_pb2.ArrowBatch(arrow_ipc=sink.getvalue(), batch_id=batch_id, row_count=table.num_rows)


def test_bulk_import_of_arrow_batches_skips_committed_batches_and_replays_by_request_id(experiments: ExperimentsClient) -> None:
    create_running(experiments, "checkout")
    exposures = exposures_for(experiments, range(300))
    now = dt.datetime.now(dt.UTC)
    batches = [
        arrow_batch(
            {
                "event_id": pa.array([e.event_id for e in exposures[i : i + 100]]),
                "unit_id": pa.array([e.unit_id for e in exposures[i : i + 100]]),
                "variant_id": pa.array([e.variant_id for e in exposures[i : i + 100]]),
                "time": pa.array([now] * len(exposures[i : i + 100]), pa.timestamp("us", tz="UTC")),
            },
            f"b{i}",
        )
        for i in range(0, 300, 100)
    ]
    header = rr.ImportEventsRequest(header=rr.ImportEventsHeader(experiment=NAME, kind=pb.EVENT_KIND_EXPOSURE, request_id="import-1"))
    stream = [header, *(rr.ImportEventsRequest(batch=b) for b in batches)]
    first = experiments.ImportEvents(iter(stream))
    assert (first.accepted_count, first.duplicate_count, first.rejected_count, first.skipped_batch_count) == (300, 0, 0, 0)
    assert experiments.ImportEvents(iter(stream)) == first  # the same import retried
    retried = [rr.ImportEventsRequest(header=rr.ImportEventsHeader(experiment=NAME, kind=pb.EVENT_KIND_EXPOSURE, request_id="import-2"))]
    retried += [rr.ImportEventsRequest(batch=b) for b in batches[1:]]
    second = experiments.ImportEvents(iter(retried))
    assert (second.accepted_count, second.skipped_batch_count) == (0, 2)
    code, reason, _ = error_of(lambda: experiments.ImportEvents(iter(stream[:2])))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ID_REUSED")
    bad = [
        rr.ImportEventsRequest(header=rr.ImportEventsHeader(experiment=NAME, kind=pb.EVENT_KIND_OUTCOME, request_id="import-3")),
        rr.ImportEventsRequest(batch=common_pb2.ArrowBatch(arrow_ipc=batches[0].arrow_ipc, batch_id="fresh", row_count=100)),
    ]
    code, reason, _ = error_of(lambda: experiments.ImportEvents(iter(bad)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MISSING_COLUMNS")
    assert sum(experiments.api.store.count_exposed_units("checkout").values()) == 300
