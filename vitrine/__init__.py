"""Vitrine: low-latency real-time recommendations.

The import package is `vitrine`; the repository's top-level folders map onto it:
`services/` → `vitrine.services`, `export/` → `vitrine.export`, `loadtest/` → `vitrine.loadtest`.
Contracts shared across services live in `vitrine.contracts`, configuration in `vitrine.settings`.
"""

__version__ = "0.1.0"
