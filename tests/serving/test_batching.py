"""Dynamic batching: concurrent requests merge into fewer ONNX Runtime calls and split back exactly."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from falaj.serving.v1 import message_pb2 as pb
from falaj_platform.runtime.errors import ResourceExhausted
from falaj_platform.services.serving.batching import BatchingPolicy, DynamicBatcher
from tests.serving.conftest import Serving, output_array
from tests.serving.models import mlp_model, mlp_reference, mlp_weights


def test_concurrent_requests_share_runs_and_each_gets_its_own_rows(start_serving: Callable[..., Serving]) -> None:
    serving = start_serving()
    version = serving.register("models/mlp/versions/1", mlp_model(serving.models_dir / "mlp.onnx"))
    # Preferred sizes make every request wait (up to the delay) for company, as in Triton.
    runtime = pb.ModelRuntimeConfig(batching=pb.DynamicBatchingConfig(enabled=True, max_batch_size=32, preferred_batch_sizes=[16]))
    runtime.batching.max_queue_delay.FromMilliseconds(20)
    serving.deploy("mlp", pb.TrafficSplit(single=pb.SingleVersionRouting(model_version=version)), runtime=runtime)
    model = serving.context.manager.get(version)
    assert model is not None and model.batcher is not None
    weights = mlp_weights()
    rng = np.random.default_rng(1)
    inputs = [rng.normal(size=(1 + i % 3, 30)).astype(np.float32) for i in range(96)]
    runs_before = model.runs
    with ThreadPoolExecutor(max_workers=24) as pool:
        responses = list(pool.map(lambda x: serving.infer("mlp", x, input_name="input"), inputs))
    for x, response in zip(inputs, responses, strict=True):
        np.testing.assert_allclose(output_array(response), mlp_reference(x, weights), rtol=1e-4, atol=1e-5)
    runs = model.runs - runs_before
    assert runs < len(inputs) / 2, f"{len(inputs)} concurrent requests took {runs} ONNX Runtime runs"


class _Slow:
    """A run function that counts calls and records batch sizes."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.sizes: list[int] = []

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> Sequence[np.ndarray]:
        time.sleep(self.delay_s)
        self.sizes.append(int(inputs["x"].shape[0]))
        return [inputs["x"] * 2]


def test_batcher_cuts_at_max_batch_size_and_keeps_request_order() -> None:
    run = _Slow(delay_s=0.01)
    in_flight = {"n": 0}
    batcher = DynamicBatcher("m", run, BatchingPolicy(max_batch_size=4, max_queue_delay_s=0.05), lambda: in_flight["n"])
    results: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        in_flight["n"] += 1
        try:
            results[i] = np.asarray(batcher.submit({"x": np.full((1, 2), i, dtype=np.float32)}, 1, timeout=5)[0])
        finally:
            in_flight["n"] -= 1

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batcher.stop()
    assert all(np.array_equal(results[i], np.full((1, 2), 2 * i)) for i in range(12))
    assert max(run.sizes) <= 4 and sum(run.sizes) == 12 and len(run.sizes) < 12


def test_a_lone_request_is_not_held_for_the_queue_delay() -> None:
    batcher = DynamicBatcher("m", _Slow(), BatchingPolicy(max_batch_size=8, max_queue_delay_s=0.5), lambda: 1)
    started = time.perf_counter()
    batcher.submit({"x": np.ones((1, 2), dtype=np.float32)}, 1, timeout=5)
    assert time.perf_counter() - started < 0.1
    batcher.stop()


def test_a_full_queue_refuses_instead_of_growing() -> None:
    gate = threading.Event()

    def blocked(inputs: Mapping[str, np.ndarray]) -> Sequence[np.ndarray]:
        gate.wait(5)
        return [inputs["x"]]

    batcher = DynamicBatcher("m", blocked, BatchingPolicy(max_batch_size=1, max_queue_size=2), lambda: 0)
    pool = ThreadPoolExecutor(max_workers=4)
    futures = [pool.submit(batcher.submit, {"x": np.ones((1, 1))}, 1, 5) for _ in range(3)]
    time.sleep(0.2)  # one running, two queued
    with pytest.raises(ResourceExhausted):
        batcher.submit({"x": np.ones((1, 1))}, 1, 5)
    gate.set()
    for future in futures:
        future.result(timeout=5)
    pool.shutdown()
    batcher.stop()


def test_overload_reaches_the_caller_as_resource_exhausted(start_serving: Callable[..., Serving]) -> None:
    serving = start_serving()
    version = serving.register("models/mlp/versions/1", mlp_model(serving.models_dir / "mlp.onnx"))
    runtime = pb.ModelRuntimeConfig(batching=pb.DynamicBatchingConfig(enabled=True, max_batch_size=1, max_queue_size=1))
    serving.deploy("mlp", pb.TrafficSplit(single=pb.SingleVersionRouting(model_version=version)), runtime=runtime)
    model = serving.context.manager.get(version)
    assert model is not None and model.batcher is not None
    gate = threading.Event()
    original = model.batcher._run

    def slow(inputs: Mapping[str, np.ndarray]) -> Sequence[np.ndarray]:
        gate.wait(5)
        return original(inputs)

    model.batcher._run = slow
    x = np.zeros((1, 30), dtype=np.float32)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(serving.infer, "mlp", x, input_name="input") for _ in range(4)]
        time.sleep(0.5)
        gate.set()
        codes = []
        for future in futures:
            try:
                future.result(timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
