"""Subcommands of ``din``: each module here with a ``register(subparsers)`` function adds its own."""
