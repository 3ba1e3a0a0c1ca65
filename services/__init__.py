"""DIN's services, one folder each: admission, classifier, scheduler, executor, telemetry, keymanager."""
