from services.admission.main import Admission
from services.admission.settings import AdmissionSettings
from shared.runtime import run_service

run_service(Admission(AdmissionSettings()))
