"""Settings every service that seals and opens payloads shares (``DIN_SECURITY``, its key file, replay window)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, model_validator

from din.shared.settings import ServiceSettings


class SecuredServiceSettings(ServiceSettings):
    """Settings of a service that seals and opens payloads: ``ServiceSettings`` plus its key file and replay window."""

    security: bool = Field(
        default=True,
        validation_alias=AliasChoices("DIN_SECURITY"),
        description=(
            "on (default): every payload sealed and authenticated; off: plaintext, for benchmark comparison only."
        ),
    )
    key_file: Path | None = Field(
        default=None, description="This process's principal key file (written by `din up` or `din keys init`)."
    )
    replay_window_s: float = Field(
        default=120.0, gt=0, description="Messages sealed longer ago than this, or seen before, are refused."
    )
    replay_cache_entries: int = Field(
        default=200_000, gt=0,
        description="Nonces remembered for replay checks; past this, the oldest go and anything older is refused.",
    )
    keys_wait_s: float = Field(default=60.0, gt=0, description="How long start-up waits for the key manager's keys.")

    @model_validator(mode="after")
    def _key_file_when_secured(self) -> SecuredServiceSettings:
        if self.security and self.key_file is None:
            name = f"{self.model_config.get('env_prefix', '')}KEY_FILE"
            raise ValueError(f"{name} is required while DIN_SECURITY is on (or set DIN_SECURITY=off)")
        return self
