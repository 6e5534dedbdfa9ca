"""`python -m vitrine …` is the `vitrine` command (used where the console script is not on PATH)."""

from vitrine.cli import app

app()
