"""Telemetry: records every service's events to Kafka and aggregates them into metrics."""
