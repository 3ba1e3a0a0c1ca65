from services.gateway.main import Gateway
from services.gateway.settings import GatewaySettings
from shared.runtime import run_service

run_service(Gateway(GatewaySettings()))
