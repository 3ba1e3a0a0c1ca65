"""Settings of the key manager (``DIN_KEYMANAGER_*``)."""

from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


class KeyManagerSettings(ServiceSettings):
    """The key manager's settings; key material options arrive with the security work (issue 4)."""

    model_config = SettingsConfigDict(env_prefix="DIN_KEYMANAGER_", extra="ignore", populate_by_name=True)
