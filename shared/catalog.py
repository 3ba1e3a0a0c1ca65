"""The model catalog: which models exist, their task and accuracy, read from a model repository's configs.

Admission uses it to refuse unknown models; the classifier to list the
variants that may answer a request (same task and inputs, preferred first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelEntry:
    """One model of the catalog."""

    name: str
    task: str
    versions: tuple[str, ...]
    accuracy: float | None
    input_signature: str

    def has_version(self, version: str | None) -> bool:
        return version is None or version in self.versions


def _best_accuracy(raw: object) -> float | None:
    if isinstance(raw, (int, float)):
        return float(raw)
    if isinstance(raw, dict) and raw:
        return max(float(v) for v in raw.values())
    return None


class ModelCatalog:
    """Models by name."""

    def __init__(self, entries: list[ModelEntry]) -> None:
        self._entries = {e.name: e for e in entries}

    @classmethod
    def from_repository(cls, root: Path) -> "ModelCatalog":
        """Read ``<root>/<model>/config.json`` for every model folder."""
        entries = []
        for config_path in sorted(Path(root).glob("*/config.json")):
            config = json.loads(config_path.read_text())
            inputs = config.get("inputs", [])
            signature = json.dumps(
                [[i.get("name"), i.get("datatype"), i.get("shape")[1:] if i.get("shape") else None] for i in inputs]
            )
            entries.append(
                ModelEntry(
                    name=config["name"],
                    task=config.get("task", "unknown"),
                    versions=tuple(str(v) for v in config.get("versions", ["1"])),
                    accuracy=_best_accuracy(config.get("accuracy")),
                    input_signature=signature,
                )
            )
        return cls(entries)

    def get(self, name: str) -> ModelEntry | None:
        return self._entries.get(name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def variants(self, name: str) -> list[ModelEntry]:
        """``name`` first, then other models of the same task and inputs, most accurate first."""
        wanted = self._entries[name]
        others = [
            e
            for e in self._entries.values()
            if e.name != name and e.task == wanted.task and e.input_signature == wanted.input_signature
        ]
        others.sort(key=lambda e: -(e.accuracy or 0.0))
        return [wanted, *others]
