from services.telemetry.main import create_runtime
from services.telemetry.settings import TelemetrySettings
from shared.runtime import run_service

run_service(create_runtime(TelemetrySettings()))
