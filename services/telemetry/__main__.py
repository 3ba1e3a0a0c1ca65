from din.services.telemetry.main import Telemetry
from din.services.telemetry.settings import TelemetrySettings
from din.shared.runtime import run_service

run_service(Telemetry(TelemetrySettings()))
