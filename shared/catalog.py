"""The model catalog: which models exist, their task and accuracy, read from a model repository's configs.

Admission uses it to refuse unknown models and multi-stage requests a model
cannot serve; the classifier to list the variants that may answer a request
(same task and inputs, preferred first); the scheduler to find a model's parts:
the head and tail of each split point, and the prefill part of a generator.

A catalog read from a repository follows it: at most every ``REFRESH_S`` a
lookup checks the configs' sizes and modification times and, when one changed,
appeared or went, reads the repository again. So a model added with ``din
models add`` (or a version added to one) is known to every service within
seconds, without a restart.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from din.shared.contracts.model_config import CONFIG_FILE, ModelConfigV1

log = logging.getLogger(__name__)

INTERNAL_ROLES = frozenset({"head", "tail", "prefill"})
"""Roles of models that are parts of another model."""
REFRESH_S = 2.0
"""How often, at most, a catalog looks whether its repository changed."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of the catalog."""

    name: str
    task: str
    versions: tuple[str, ...]
    accuracy: float | None
    input_signature: str
    role: str | None = None
    split_of: str | None = None
    split_point: str | None = None
    prefill_model: str | None = None
    vocab: str | None = None
    hidden: int | None = None
    input_bytes: int | None = None
    intermediate_bytes: int | None = None
    leakage: float | None = None

    @property
    def internal(self) -> bool:
        """Whether the model is a part of another (a split head or tail, a prefill graph): DIN runs it inside a
        job of the whole model, a tenant never calls it directly (its raw activations are the intermediates
        split inference protects)."""
        return self.role in INTERNAL_ROLES

    def has_version(self, version: str | None) -> bool:
        return version is None or version in self.versions

    @classmethod
    def from_config(cls, config: ModelConfigV1) -> ModelEntry:
        """The catalog's view of one model's config."""
        signature = json.dumps([[t.name, t.datatype.value, t.shape[1:] if t.shape else None] for t in config.inputs])
        return cls(
            name=config.name,
            task=config.task,
            versions=tuple(config.versions),
            accuracy=config.best_accuracy(),
            input_signature=signature,
            role=config.role,
            split_of=config.split_of,
            split_point=config.split_point,
            prefill_model=config.prefill_model,
            vocab=config.vocab,
            hidden=config.hidden,
            input_bytes=config.input_bytes_per_item,
            intermediate_bytes=config.intermediate_bytes_per_item,
            leakage=config.leakage.recovered_variance if config.leakage else None,
        )


class ModelCatalog:
    """Models by name (with ``root``: the repository they were read from, which the catalog follows)."""

    def __init__(self, entries: list[ModelEntry], skipped: list[str] | None = None, *,
                 configs: dict[str, ModelConfigV1] | None = None, root: Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._entries = {e.name: e for e in entries}
        self._configs = dict(configs or {})
        self.skipped = list(skipped or [])
        """The configs left out because they were not valid, each with why (file first)."""
        self.root = root
        self._clock = clock
        self._checked = clock()
        self._seen = _fingerprint(root) if root is not None else ()

    @classmethod
    def from_repository(cls, root: Path, clock: Callable[[], float] = time.monotonic) -> ModelCatalog:
        """Read ``<root>/<model>/config.json`` for every model folder. A config that is not valid, or names
        another model than its folder, is left out with one warning naming the file (``skipped``): one bad
        model never stops the services that read the catalog."""
        configs, skipped = _read(Path(root))
        return cls([ModelEntry.from_config(c) for c in configs.values()], skipped, configs=configs, root=Path(root),
                   clock=clock)

    def refresh(self) -> bool:
        """Read the repository again if a config changed since the last look (at most every ``REFRESH_S``);
        True when it did."""
        now = self._clock()
        if self.root is None or now - self._checked < REFRESH_S:
            return False
        self._checked = now
        seen = _fingerprint(self.root)
        if seen == self._seen:
            return False
        configs, skipped = _read(self.root)
        added = sorted(set(configs) - set(self._configs))
        gone = sorted(set(self._configs) - set(configs))
        changed = sorted(n for n in set(configs) & set(self._configs) if configs[n] != self._configs[n])
        self._seen, self._configs, self.skipped = seen, configs, skipped
        self._entries = {name: ModelEntry.from_config(config) for name, config in configs.items()}
        log.info("model catalog of %s changed: added %s, removed %s, changed %s", self.root,
                 ", ".join(added) or "none", ", ".join(gone) or "none", ", ".join(changed) or "none")
        return True

    def config(self, name: str) -> ModelConfigV1 | None:
        """The whole config of ``name`` (a catalog read from a repository), or None."""
        self.refresh()
        return self._configs.get(name)

    def get(self, name: str) -> ModelEntry | None:
        self.refresh()
        return self._entries.get(name)

    def names(self) -> list[str]:
        self.refresh()
        return sorted(self._entries)

    def split_parts(self, name: str) -> dict[str, tuple[str, str]]:
        """``name``'s split points, each with its (head, tail) model names, in the repository's order."""
        self.refresh()
        heads = {e.split_point: e.name for e in self._entries.values() if e.split_of == name and e.role == "head"}
        tails = {e.split_point: e.name for e in self._entries.values() if e.split_of == name and e.role == "tail"}
        return {point: (heads[point], tails[point]) for point in sorted(heads) if point in tails}

    def variants(self, name: str) -> list[ModelEntry]:
        """``name`` first, then other models of the same task and inputs, most accurate first."""
        self.refresh()
        wanted = self._entries[name]
        others = [
            e
            for e in self._entries.values()
            if e.name != name and e.task == wanted.task and e.input_signature == wanted.input_signature
        ]
        others.sort(key=lambda e: -(e.accuracy or 0.0))
        return [wanted, *others]


def _fingerprint(root: Path) -> tuple:
    """What identifies the repository's configs now: each one's path, size and modification time."""
    found = []
    for path in sorted(Path(root).glob(f"*/{CONFIG_FILE}")):
        try:
            stat = path.stat()
        except OSError:
            continue
        found.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(found)


def _read(root: Path) -> tuple[dict[str, ModelConfigV1], list[str]]:
    """The valid configs under ``root`` by model name, and why each other one was left out."""
    configs, skipped = {}, []
    for path in sorted(root.glob(f"*/{CONFIG_FILE}")):
        try:
            config = ModelConfigV1.read(path)
            if config.name != path.parent.name:
                raise ValueError(f"{path}: names model {config.name!r}, not its folder {path.parent.name!r}")
        except ValueError as exc:
            log.warning("model config left out: %s", exc)
            skipped.append(str(exc))
            continue
        configs[config.name] = config
    return configs, skipped
