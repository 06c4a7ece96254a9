"""Experiments from design to decision through the real service: create, read, list, update,
start, stop, conclude, delete; every change audited; bad input gets a clear status."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from google.protobuf import field_mask_pb2

from falaj.common.v1 import common_pb2
from falaj.experiments.v1 import message_pb2 as pb
from falaj.experiments.v1 import request_response_pb2 as rr
from falaj_platform.runtime.settings import Settings
from tests.conftest import ServiceUnderTest, caller
from tests.experiments.conftest import ExperimentsClient, create_running, design, error_of

NAME = "experiments/checkout"


def test_experiment_goes_from_draft_to_concluded_and_every_change_is_audited(experiments: ExperimentsClient) -> None:
    created = experiments.CreateExperiment(rr.CreateExperimentRequest(experiment_id="checkout", experiment=design())).experiment
    assert created.name == NAME
    assert created.state == pb.EXPERIMENT_STATE_DRAFT
    assert created.created.actor == "spiffe://falaj.local/client/alice"
    assert created.hashing.salt == "checkout"  # empty salt uses the experiment id
    assert [(r.variant_id, r.start_bucket, r.end_bucket) for r in created.bucket_ranges] == [
        ("control", 0, 5000),
        ("treatment", 5000, 10000),
    ]
    assert experiments.GetExperiment(rr.GetExperimentRequest(name=NAME)).experiment == created

    renamed = experiments.UpdateExperiment(
        rr.UpdateExperimentRequest(
            experiment=pb.Experiment(name=NAME, display_name="Checkout ranking v2", etag=created.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            reason="clearer title",
        )
    ).experiment
    assert renamed.display_name == "Checkout ranking v2"
    assert renamed.config_revision == created.config_revision  # a title does not change assignments
    assert renamed.etag != created.etag

    running = experiments.StartExperiment(rr.StartExperimentRequest(name=NAME, reason="approved by the review board")).experiment
    assert running.state == pb.EXPERIMENT_STATE_RUNNING
    assert running.HasField("start_time")
    assert running.config_revision == renamed.config_revision + 1

    stopped = experiments.StopExperiment(rr.StopExperimentRequest(name=NAME, reason="enough data")).experiment
    assert stopped.state == pb.EXPERIMENT_STATE_STOPPED
    assert stopped.stop_reason.cause == pb.STOP_CAUSE_USER
    assert stopped.stop_reason.message == "enough data"

    concluded = experiments.ConcludeExperiment(
        rr.ConcludeExperimentRequest(name=NAME, conclusion=pb.Conclusion(winning_variant_id="treatment", summary="ship it: +3% revenue"))
    ).experiment
    assert concluded.state == pb.EXPERIMENT_STATE_CONCLUDED
    assert concluded.conclusion.winning_variant_id == "treatment"
    history = [(t.from_state, t.to_state, t.reason) for t in concluded.state_history]
    assert history == [
        (pb.EXPERIMENT_STATE_UNSPECIFIED, pb.EXPERIMENT_STATE_DRAFT, "created"),
        (pb.EXPERIMENT_STATE_DRAFT, pb.EXPERIMENT_STATE_RUNNING, "approved by the review board"),
        (pb.EXPERIMENT_STATE_RUNNING, pb.EXPERIMENT_STATE_STOPPED, "enough data"),
        (pb.EXPERIMENT_STATE_STOPPED, pb.EXPERIMENT_STATE_CONCLUDED, "ship it: +3% revenue"),
    ]
    assert all(t.changed.actor == "spiffe://falaj.local/client/alice" for t in concluded.state_history)

    assert experiments.audit.actions(NAME) == ["create", "update", "start", "stop", "conclude"]
    stop_event = experiments.audit.events[3]
    assert stop_event["caller"] == "spiffe://falaj.local/client/alice"
    assert stop_event["attributes"]["from_state"] == "RUNNING" and stop_event["attributes"]["to_state"] == "STOPPED"
    assert stop_event["event_type"] == 9  # SECURITY_EVENT_TYPE_EXPERIMENT_CHANGED

    # A concluded experiment is read-only apart from description and labels.
    code, reason, _ = error_of(
        lambda: experiments.UpdateExperiment(
            rr.UpdateExperimentRequest(
                experiment=pb.Experiment(name=NAME, display_name="x"), update_mask=field_mask_pb2.FieldMask(paths=["display_name"])
            )
        )
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "FIELD_FROZEN_IN_STATE")


def test_lifecycle_retries_with_a_request_id_return_the_first_answer(experiments: ExperimentsClient) -> None:
    experiments.CreateExperiment(rr.CreateExperimentRequest(experiment_id="checkout", experiment=design()))
    first = experiments.StartExperiment(rr.StartExperimentRequest(name=NAME, request_id="start-1"))
    again = experiments.StartExperiment(rr.StartExperimentRequest(name=NAME, request_id="start-1"))
    assert again == first
    assert experiments.audit.actions(NAME) == ["create", "start"]
    code, reason, _ = error_of(lambda: experiments.StartExperiment(rr.StartExperimentRequest(name=NAME)))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INVALID_STATE")


def test_list_pages_newest_first_and_filters_by_state_and_deployment(experiments: ExperimentsClient) -> None:
    for index in range(5):
        experiments.CreateExperiment(rr.CreateExperimentRequest(experiment_id=f"exp-{index}", experiment=design()))
    experiments.StartExperiment(rr.StartExperimentRequest(name="experiments/exp-3"))
    names: list[str] = []
    token = ""
    while True:
        page = experiments.ListExperiments(rr.ListExperimentsRequest(page_size=2, page_token=token))
        names += [e.name for e in page.experiments]
        token = page.next_page_token
        if not token:
            break
    assert names == [f"experiments/exp-{i}" for i in (4, 3, 2, 1, 0)]
    running = experiments.ListExperiments(rr.ListExperimentsRequest(state=pb.EXPERIMENT_STATE_RUNNING)).experiments
    assert [e.name for e in running] == ["experiments/exp-3"]
    by_deployment = experiments.ListExperiments(rr.ListExperimentsRequest(deployment="deployments/checkout-treatment")).experiments
    assert len(by_deployment) == 5
    assert experiments.ListExperiments(rr.ListExperimentsRequest(deployment="deployments/other")).experiments == []
    code, reason, _ = error_of(lambda: experiments.ListExperiments(rr.ListExperimentsRequest(page_token="not-a-token")))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


def test_delete_only_a_draft_and_a_retried_delete_succeeds(experiments: ExperimentsClient) -> None:
    created = experiments.CreateExperiment(rr.CreateExperimentRequest(experiment_id="checkout", experiment=design())).experiment
    code, reason, _ = error_of(lambda: experiments.DeleteExperiment(rr.DeleteExperimentRequest(name=NAME, etag="stale")))
    assert (code, reason) == (grpc.StatusCode.ABORTED, "ETAG_MISMATCH")
    deleted = experiments.DeleteExperiment(rr.DeleteExperimentRequest(name=NAME, etag=created.etag, request_id="del-1"))
    assert deleted.name == NAME
    assert experiments.DeleteExperiment(rr.DeleteExperimentRequest(name=NAME, etag=created.etag, request_id="del-1")) == deleted
    code, _, _ = error_of(lambda: experiments.GetExperiment(rr.GetExperimentRequest(name=NAME)))
    assert code == grpc.StatusCode.NOT_FOUND

    create_running(experiments, "live")
    code, reason, message = error_of(lambda: experiments.DeleteExperiment(rr.DeleteExperimentRequest(name="experiments/live")))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INVALID_STATE")
    assert "evidence" in message


def _bad_allocation() -> pb.Experiment:
    return design(weights={"control": 5000, "treatment": 4000})


@pytest.mark.parametrize(
    ("experiment_id", "experiment", "code", "reason"),
    [
        ("checkout", _bad_allocation(), grpc.StatusCode.INVALID_ARGUMENT, "ALLOCATION_NOT_100_PERCENT"),
        ("Checkout!", design(), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_EXPERIMENT_ID"),
        ("checkout", design(weights={"control": 10000}), grpc.StatusCode.INVALID_ARGUMENT, "TOO_FEW_VARIANTS"),
        ("checkout", design(metrics=[]), grpc.StatusCode.INVALID_ARGUMENT, "METRIC_REQUIRED"),
        (
            "checkout",
            design(guardrails=[pb.Guardrail(metric_id="latency")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNKNOWN_METRIC",
        ),
        ("checkout", design(coverage_bps=12000), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_COVERAGE"),
    ],
)
def test_invalid_designs_are_refused_and_nothing_is_stored(
    experiments: ExperimentsClient, experiment_id: str, experiment: pb.Experiment, code: grpc.StatusCode, reason: str
) -> None:
    got_code, got_reason, message = error_of(
        lambda: experiments.CreateExperiment(rr.CreateExperimentRequest(experiment_id=experiment_id, experiment=experiment))
    )
    assert (got_code, got_reason) == (code, reason), message
    assert experiments.ListExperiments(rr.ListExperimentsRequest()).experiments == []
    assert experiments.audit.events == []


def test_allocation_message_says_what_it_sums_to(experiments: ExperimentsClient) -> None:
    _, _, message = error_of(
        lambda: experiments.CreateExperiment(rr.CreateExperimentRequest(experiment_id="checkout", experiment=_bad_allocation()))
    )
    assert "sum to 9000" in message and "100%" in message


def test_other_bad_requests_get_clear_statuses(experiments: ExperimentsClient) -> None:
    checks: list[tuple[Callable[[], object], grpc.StatusCode, str]] = [
        (
            lambda: experiments.GetExperiment(rr.GetExperimentRequest(name="experiments/nope")),
            grpc.StatusCode.NOT_FOUND,
            "EXPERIMENT_NOT_FOUND",
        ),
        (
            lambda: experiments.GetExperiment(rr.GetExperimentRequest(name="nope")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_EXPERIMENT_NAME",
        ),
        (
            lambda: experiments.AssignVariant(rr.AssignVariantRequest(experiment="experiments/nope", unit_id="u1")),
            grpc.StatusCode.NOT_FOUND,
            "EXPERIMENT_NOT_FOUND",
        ),
        (
            lambda: experiments.RecordExposures(
                rr.RecordExposuresRequest(
                    experiment="experiments/nope", request_id="r1", exposures=[pb.Exposure(event_id="e", unit_id="u")]
                )
            ),
            grpc.StatusCode.NOT_FOUND,
            "EXPERIMENT_NOT_FOUND",
        ),
        (
            lambda: experiments.CalculatePower(rr.CalculatePowerRequest(metric_type=pb.METRIC_TYPE_BINARY, baseline_mean=0.1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "SOLVE_FOR_REQUIRED",
        ),
    ]
    experiments.CreateExperiment(rr.CreateExperimentRequest(experiment_id="checkout", experiment=design()))
    checks += [
        (
            lambda: experiments.CreateExperiment(rr.CreateExperimentRequest(experiment_id="checkout", experiment=design())),
            grpc.StatusCode.ALREADY_EXISTS,
            "EXPERIMENT_EXISTS",
        ),
        (lambda: experiments.StopExperiment(rr.StopExperimentRequest(name=NAME)), grpc.StatusCode.FAILED_PRECONDITION, "INVALID_STATE"),
        (
            lambda: experiments.AnalyzeExperiment(rr.AnalyzeExperimentRequest(experiment=NAME)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "INVALID_STATE",
        ),
        (
            lambda: experiments.UpdateExperiment(
                rr.UpdateExperimentRequest(experiment=pb.Experiment(name=NAME), update_mask=field_mask_pb2.FieldMask(paths=["residency"]))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "FIELD_NOT_UPDATABLE",
        ),
        (
            lambda: experiments.UpdateExperiment(rr.UpdateExperimentRequest(experiment=pb.Experiment(name=NAME))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "UPDATE_MASK_REQUIRED",
        ),
        (
            lambda: experiments.CreateExperiment(
                rr.CreateExperimentRequest(
                    experiment_id="elsewhere",
                    experiment=pb.Experiment(
                        **{k: v for k, v in ((f.name, v) for f, v in design().ListFields()) if k != "residency"},
                        residency=common_pb2.Residency(region="ae-auh"),
                    ),
                )
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "RESIDENCY_MISMATCH",
        ),
    ]
    for call, code, reason in checks:
        got_code, got_reason, message = error_of(call)
        assert (got_code, got_reason) == (code, reason), message
    refused = [e for e in experiments.audit.events if e["action"] == "create" and e.get("allowed") is False]
    assert len(refused) == 1 and refused[0]["attributes"]["requested_region"] == "ae-auh"


def test_running_experiment_keeps_its_design_but_may_add_metrics(experiments: ExperimentsClient) -> None:
    running = create_running(experiments, "checkout")
    code, reason, _ = error_of(
        lambda: experiments.UpdateExperiment(
            rr.UpdateExperimentRequest(experiment=pb.Experiment(name=NAME), update_mask=field_mask_pb2.FieldMask(paths=["variants"]))
        )
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "FIELD_FROZEN_IN_STATE")
    metrics = [*running.metrics, pb.MetricDefinition(metric_id="latency_ms", type=pb.METRIC_TYPE_CONTINUOUS, role=pb.METRIC_ROLE_GUARDRAIL)]
    updated = experiments.UpdateExperiment(
        rr.UpdateExperimentRequest(
            experiment=pb.Experiment(name=NAME, metrics=metrics), update_mask=field_mask_pb2.FieldMask(paths=["metrics"])
        )
    ).experiment
    assert [m.metric_id for m in updated.metrics] == ["revenue", "converted", "latency_ms"]
    code, reason, _ = error_of(
        lambda: experiments.UpdateExperiment(
            rr.UpdateExperimentRequest(
                experiment=pb.Experiment(name=NAME, metrics=metrics[:1]), update_mask=field_mask_pb2.FieldMask(paths=["metrics"])
            )
        )
    )
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "FIELD_FROZEN_IN_STATE")


def test_production_wiring_serves_without_a_test_audit_sink(
    start_service_under_test: Callable[..., ServiceUnderTest], settings_for: Callable[..., Settings]
) -> None:
    from falaj.experiments.v1 import service_pb2_grpc

    service = start_service_under_test("experiments")
    stub = service_pb2_grpc.ExperimentsServiceStub(service.channel)
    assert list(stub.ListExperiments(rr.ListExperimentsRequest(), metadata=caller("alice"), timeout=10).experiments) == []
    plan = stub.CalculatePower(
        rr.CalculatePowerRequest(metric_type=pb.METRIC_TYPE_BINARY, baseline_mean=0.1, sample_size=rr.SolveSampleSize(relative_effect=0.1)),
        metadata=caller("alice"),
        timeout=10,
    )
    assert plan.units_per_variant > 0


def test_validate_only_checks_without_storing_or_auditing(experiments: ExperimentsClient) -> None:
    checked = experiments.CreateExperiment(rr.CreateExperimentRequest(experiment_id="checkout", experiment=design(), validate_only=True))
    assert checked.experiment.state == pb.EXPERIMENT_STATE_DRAFT
    assert experiments.ListExperiments(rr.ListExperimentsRequest()).experiments == []
    created = experiments.CreateExperiment(rr.CreateExperimentRequest(experiment_id="checkout", experiment=design())).experiment
    preview = experiments.UpdateExperiment(
        rr.UpdateExperimentRequest(
            experiment=pb.Experiment(name=NAME, description="new words"),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            validate_only=True,
        )
    ).experiment
    assert preview.description == "new words"
    assert experiments.GetExperiment(rr.GetExperimentRequest(name=NAME)).experiment == created
    assert experiments.audit.actions(NAME) == ["create"]
    code, reason, _ = error_of(
        lambda: experiments.CreateExperiment(rr.CreateExperimentRequest(experiment_id="checkout", experiment=design(), validate_only=True))
    )
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "EXPERIMENT_EXISTS")
