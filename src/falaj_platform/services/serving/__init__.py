"""Serving service: ONNX Runtime inference over the Open Inference Protocol, deployments and traffic splits."""
