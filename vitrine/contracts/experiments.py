"""What an experiment's name may be: one definition for the gateway's `Experiment` (what `SetExperiment` and
`vitrine ab set` accept), the exposure record (what the outcome service accepts from `recs.served`) and every
store that builds a key or a field from it.

Letters, digits, `_`, `.` and `-`, starting with a letter or digit, at most 64 characters: safe in Redis keys,
in the outcome store's ␟-separated fields, in Prometheus label values and in file names.
"""

from __future__ import annotations

import re
from typing import Annotated, Final

from pydantic import StringConstraints

EXPERIMENT_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
ExperimentName = Annotated[str, StringConstraints(pattern=EXPERIMENT_NAME_PATTERN)]
"""A valid experiment name (pydantic field type)."""
ExperimentNameOrNone = Annotated[str, StringConstraints(pattern=f"(?:{EXPERIMENT_NAME_PATTERN})|^$")]
"""A valid experiment name, or "" (records written before experiments had names)."""
_NAME: Final = re.compile(EXPERIMENT_NAME_PATTERN)


def is_experiment_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None
