"""Settings of the classifier service (``DIN_CLASSIFIER_*``)."""

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from din.shared.security.settings import SecuredServiceSettings
from din.shared.sensitivity import SENSITIVE_LABELS


class ClassifierSettings(SecuredServiceSettings):
    """Where the tenant policies and the model catalog are, and the key file of its site (its identity signs its
    errors, its site's data key tags the jobs it hands on)."""

    model_config = SettingsConfigDict(env_prefix="DIN_CLASSIFIER_", extra="ignore", populate_by_name=True)

    topology: Path = Field(validation_alias=AliasChoices("DIN_TOPOLOGY"), description="Topology file (tenant policy).")
    model_repo: Path = Field(
        validation_alias=AliasChoices("DIN_MODEL_REPO"), description="Model repository whose configs list the models."
    )
    sensitive_labels: list[str] = Field(
        default=list(SENSITIVE_LABELS),
        description="Request labels that mark data as sensitive.",
    )
