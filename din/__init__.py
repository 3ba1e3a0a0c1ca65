"""DIN command line and local stack tooling."""
