from services.executor.main import create_runtime
from services.executor.settings import ExecutorSettings
from shared.runtime import run_service

run_service(create_runtime(ExecutorSettings()))
