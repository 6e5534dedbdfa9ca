"""Vitrine's long-running processes, one sub-package each (installed as `vitrine.services`)."""
