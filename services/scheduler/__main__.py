from din.services.scheduler.main import Scheduler
from din.services.scheduler.settings import SchedulerSettings
from din.shared.runtime import run_service

run_service(Scheduler(SchedulerSettings()))
