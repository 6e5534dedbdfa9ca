"""Experiment statistics: pure functions from per-user outcome rows to decisions (no services, no I/O).

The user is the unit of randomisation, so every statistic here is computed over users
(`vitrine.contracts.outcomes.UserOutcome` / `InterleavedOutcome`). One entry point,
`vitrine.experiments.analysis.analyse`; the pieces it uses live in their own modules:

- `estimators`: per-variant means, ratio metrics (delta method), lifts, the fixed-horizon test
- `sequential`: mSPRT, the always-valid p-value and confidence sequence
- `srm`: the sample-ratio-mismatch χ² check
- `cuped`: variance reduction with a pre-experiment covariate
- `interleaving`: team-draft interleaving preference share and its sign test
- `simulation`: the generative model and the error-rate / power benchmark (`vitrine bench stats`)
"""
