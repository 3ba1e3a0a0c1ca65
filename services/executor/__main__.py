from din.services.executor.main import Executor
from din.services.executor.settings import ExecutorSettings
from din.shared.runtime import run_service

run_service(Executor(ExecutorSettings()))
