"""Settings of the admission service (``DIN_ADMISSION_*``)."""

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from din.shared.security import SecuredServiceSettings
from din.shared.sensitivity import SENSITIVE_LABELS


class AdmissionSettings(SecuredServiceSettings):
    """Where tenants and their secrets are, how much admission lets through, and its key file."""

    model_config = SettingsConfigDict(env_prefix="DIN_ADMISSION_", extra="ignore", populate_by_name=True)

    topology: Path = Field(
        validation_alias=AliasChoices("DIN_TOPOLOGY"), description="Topology file (tenants, quotas)."
    )
    model_repo: Path = Field(
        validation_alias=AliasChoices("DIN_MODEL_REPO"), description="Model repository whose configs list the models."
    )
    credentials_file: Path = Field(description="JSON file with each tenant's token secret.")
    sensitive_labels: list[str] = Field(
        default=list(SENSITIVE_LABELS),
        description="Request labels (Din-Labels header) that mark data as sensitive: such a request is opened only "
        "at one of the tenant's sensitive sites, and handed there unopened from any other site.",
    )
    max_payload_bytes: int = Field(default=4 * 1024 * 1024, description="Largest request body accepted.")
    proof_window_s: float = Field(
        default=30.0, gt=0, le=3600,
        description="A request's token proof (din2) is accepted this long either side of the time it was issued, "
        "and once.",
    )
    bearer_tokens: bool = Field(
        default=False,
        description="Also accept a bare tenant token (din1) on the bus, reusable by whoever captures it until it "
        "expires; off, only request-bound proofs are accepted (clients made before proofs need it on).",
    )
    shed_factor: float = Field(
        default=1.0, description="Before any job has completed: shed new requests once in-flight jobs exceed the "
        "executors' capacity times this."
    )
    shed_target_ms: float = Field(
        default=150.0, gt=0,
        description="Queueing the path may build before admission sheds: past it (jobs wait this long before "
        "their compute), each tenant is admitted at its weighted fair share of the completion rate.",
    )
