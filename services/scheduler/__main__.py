from services.scheduler.main import create_runtime
from services.scheduler.settings import SchedulerSettings
from shared.runtime import run_service

run_service(create_runtime(SchedulerSettings()))
