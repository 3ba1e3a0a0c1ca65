from din.services.autoscaler.main import Autoscaler
from din.services.autoscaler.settings import AutoscalerSettings
from din.shared.runtime import run_service

run_service(Autoscaler(AutoscalerSettings()))
