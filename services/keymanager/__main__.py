from services.keymanager.main import KeyManager
from services.keymanager.settings import KeyManagerSettings
from shared.runtime import run_service

run_service(KeyManager(KeyManagerSettings()))
