from services.keymanager.main import create_runtime
from services.keymanager.settings import KeyManagerSettings
from shared.runtime import run_service

run_service(create_runtime(KeyManagerSettings()))
