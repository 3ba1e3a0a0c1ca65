"""Classifier: gives every admitted request a workload class (task, SLA, size, sensitivity, candidate models)."""
