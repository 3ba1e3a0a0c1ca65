from services.scheduler.main import Scheduler
from services.scheduler.settings import SchedulerSettings
from shared.runtime import run_service

run_service(Scheduler(SchedulerSettings()))
