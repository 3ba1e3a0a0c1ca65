"""Executor service: loads ONNX models, batches requests and runs them."""
