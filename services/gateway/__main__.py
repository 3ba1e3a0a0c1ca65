from din.services.gateway.main import Gateway
from din.services.gateway.settings import GatewaySettings
from din.shared.runtime import run_service

run_service(Gateway(GatewaySettings()))
