"""Scheduler: keeps the executor registry and link table, places every job, and owns its single answer."""
