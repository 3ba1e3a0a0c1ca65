from services.classifier.main import Classifier
from services.classifier.settings import ClassifierSettings
from shared.runtime import run_service

run_service(Classifier(ClassifierSettings()))
