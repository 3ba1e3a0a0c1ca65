"""Settings of the key manager (``DIN_KEYMANAGER_*``)."""

from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from din.shared.security import CryptoPolicy
from din.shared.settings import ServiceSettings


class KeyManagerSettings(ServiceSettings):
    """Where the key store and master key are, the crypto policy, and how often keys rotate."""

    model_config = SettingsConfigDict(env_prefix="DIN_KEYMANAGER_", extra="ignore", populate_by_name=True)

    topology: Path = Field(
        validation_alias=AliasChoices("DIN_TOPOLOGY"), description="Topology file (sites, links, tenants)."
    )
    security: bool = Field(
        default=True,
        validation_alias=AliasChoices("DIN_SECURITY"),
        description="on (default): distribute keys; off: answer health only (benchmark comparison).",
    )
    keystore: Path | None = Field(default=None, description="keystore.json written by `din keys init` or `din up`.")
    master_key_file: Path | None = Field(
        default=None, description="File holding the master key the store is wrapped under."
    )
    policy: CryptoPolicy = Field(
        default_factory=CryptoPolicy,
        description=(
            "Per-path crypto policy as JSON: {\"paths\": {path type: level}, \"plaintext_ingress\": [tenants]}."
        ),
    )
    rotate_interval_s: float = Field(
        default=3600.0, gt=0, description="Seconds between scheduled rotations of every DEK."
    )
    grace_s: float = Field(default=600.0, ge=0, description="How long a rotated-out DEK version still opens messages.")
    activation_delay_s: float = Field(
        default=1.0, ge=0, description="How long a new DEK version is only distributed before it starts sealing."
    )
    revoke_grace_s: float = Field(
        default=5.0, ge=0, description="Grace of the DEKs a revoked principal held, rotated at its revocation."
    )
    command_window_s: float = Field(default=60.0, gt=0, description="Operator commands older than this are refused.")
    mirror_check_interval_s: float = Field(
        default=5.0, gt=0,
        description="Seconds between looks at every site's mirror of the keys bucket (a missing one is recreated).",
    )
    bucket_check_interval_s: float = Field(
        default=2.0, gt=0,
        description=("Seconds between looks at the keys bucket: entries deleted or overwritten by anyone else are "
                     "written back, a deleted bucket is created again; not ready while damaged."),
    )

    @model_validator(mode="after")
    def _key_files_when_secured(self) -> "KeyManagerSettings":
        if self.security:
            for name in ("keystore", "master_key_file"):
                if getattr(self, name) is None:
                    raise ValueError(f"DIN_KEYMANAGER_{name.upper()} is required while DIN_SECURITY is on")
        return self
