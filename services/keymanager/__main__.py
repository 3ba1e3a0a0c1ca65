from din.services.keymanager.main import KeyManager
from din.services.keymanager.settings import KeyManagerSettings
from din.shared.runtime import run_service

run_service(KeyManager(KeyManagerSettings()))
