from services.admission.main import create_runtime
from services.admission.settings import AdmissionSettings
from shared.runtime import run_service

run_service(create_runtime(AdmissionSettings()))
