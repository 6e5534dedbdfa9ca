"""CLI commands that live in a module of their own, registered on the root app in `vitrine/cli.py`."""
