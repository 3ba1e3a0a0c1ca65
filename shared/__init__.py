"""DIN's common library: contracts, names, settings, errors and bus wiring shared by every service."""

__version__ = "0.1.0"
