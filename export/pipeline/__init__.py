"""The retraining pipeline (`vitrine pipeline run`): validate → train → evaluate → gate → export, one module per step.

`runner.py` orders the steps, holds the lock and records every step through a `RunRecorder` (record.py);
docs/pipeline.md describes the whole flow."""
