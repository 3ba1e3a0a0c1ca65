"""Which request labels make data sensitive: one rule for the admission that decides where a request may be
opened and the classifier that confines where it may run."""

from __future__ import annotations

from collections.abc import Iterable

SENSITIVE_LABELS = ("sensitive", "pii", "confidential", "restricted")
"""Labels that mark a request's data as sensitive unless a service is configured otherwise."""


def header_labels(value: str | None) -> list[str]:
    """The labels of a ``Din-Labels`` header (comma-separated), empty ones dropped."""
    return [label for label in (part.strip() for part in (value or "").split(",")) if label]


def marks_sensitive(labels: Iterable[str], sensitive_labels: Iterable[str] = SENSITIVE_LABELS) -> bool:
    """Whether any of ``labels`` (case-insensitive) is one of ``sensitive_labels``."""
    sensitive = {label.lower() for label in sensitive_labels}
    return any(label.lower() in sensitive for label in labels)
