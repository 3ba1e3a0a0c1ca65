from services.classifier.main import create_runtime
from services.classifier.settings import ClassifierSettings
from shared.runtime import run_service

run_service(create_runtime(ClassifierSettings()))
