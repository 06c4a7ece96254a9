"""Training service: torch training jobs, ONNX export with parity check, and the model registry."""
