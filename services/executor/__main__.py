from services.executor.main import Executor
from services.executor.settings import ExecutorSettings
from shared.runtime import run_service

run_service(Executor(ExecutorSettings()))
