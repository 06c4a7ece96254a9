"""A stock Open Inference Protocol client (tritonclient) calling Falaj through the gateway.

Run as a script in a process of its own (`python triton_client.py JOB.json`): tritonclient
and the platform's SDK both define the `inference.*` protobuf messages, and one process
cannot import both. It imports nothing from Falaj. The job file says where to connect,
which model (deployment) to call, and the rows to send, one request per row; it prints
one JSON line with every answer: output, model version, route, variant, latency.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def main(path: str) -> int:
    import numpy as np
    import tritonclient.grpc as triton

    job: dict[str, Any] = json.loads(open(path, encoding="utf-8").read())
    client = triton.InferenceServerClient(
        url=job["url"],
        ssl=True,
        root_certificates=job["ca"],
        private_key=job["key"],
        certificate_chain=job["cert"],
        channel_args=[("grpc.ssl_target_name_override", "localhost")],
    )
    model = job["model"]
    answers: list[dict[str, Any]] = []
    try:
        if not client.is_model_ready(model):
            print(json.dumps({"error": f"model {model} is not ready"}))
            return 1
        metadata = client.get_model_metadata(model)
        rows = np.asarray(job["rows"], dtype=np.float32)
        for index, row in enumerate(rows):
            tensor = triton.InferInput(job["input"], [1, rows.shape[1]], "FP32")
            tensor.set_data_from_numpy(row.reshape(1, -1))
            parameters = {name: str(values[index]) for name, values in job.get("parameters", {}).items()}
            started = time.perf_counter()
            result = client.infer(
                model,
                [tensor],
                outputs=[triton.InferRequestedOutput(job["output"])],
                request_id=f"{job['request_prefix']}-{index}",
                parameters=parameters or None,
            )
            latency_ms = (time.perf_counter() - started) * 1000.0
            response = result.get_response()
            params = response.parameters
            answers.append(
                {
                    "output": float(np.asarray(result.as_numpy(job["output"])).reshape(-1)[0]),
                    "version": response.model_version,
                    "route": params["falaj.route"].string_param if "falaj.route" in params else "",
                    "variant": params["falaj.variant"].string_param if "falaj.variant" in params else "",
                    "latency_ms": latency_ms,
                }
            )
    except triton.InferenceServerException as error:
        print(json.dumps({"error": f"{error.status()}: {error.message()}", "answers": answers}))
        return 1
    finally:
        client.close()
    print(json.dumps({"server_inputs": [[i.name, i.datatype, list(i.shape)] for i in metadata.inputs], "answers": answers}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
