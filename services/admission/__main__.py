from din.services.admission.main import Admission
from din.services.admission.settings import AdmissionSettings
from din.shared.runtime import run_service

run_service(Admission(AdmissionSettings()))
