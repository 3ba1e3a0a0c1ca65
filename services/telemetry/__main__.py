from services.telemetry.main import Telemetry
from services.telemetry.settings import TelemetrySettings
from shared.runtime import run_service

run_service(Telemetry(TelemetrySettings()))
