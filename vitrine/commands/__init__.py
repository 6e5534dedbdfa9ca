"""CLI command modules, one per role; registered on the root app in `vitrine/cli.py`."""
