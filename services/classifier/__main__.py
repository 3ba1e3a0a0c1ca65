from din.services.classifier.main import Classifier
from din.services.classifier.settings import ClassifierSettings
from din.shared.runtime import run_service

run_service(Classifier(ClassifierSettings()))
