"""Key manager's front door. It answers health today; identities and keys arrive with issue 4."""

from __future__ import annotations

from services.keymanager.settings import KeyManagerSettings
from shared.runtime import ServiceRuntime


def create_runtime(settings: KeyManagerSettings) -> ServiceRuntime:
    """Build the key manager service."""
    runtime = ServiceRuntime("keymanager", settings)
    runtime.detail = lambda: {"identities": 0}
    return runtime
