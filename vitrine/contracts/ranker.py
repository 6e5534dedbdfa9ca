"""The ranker models' tensor contract, shared by the export step and the gateway.

Every ranker in the model repository takes a left-padded history and exclusions and returns top-k:

    item_ids     INT64 [batch, max_len]  model item ids, 0 = padding, 1 = unknown item
    event_types  INT64 [batch, max_len]  EventType.index of each step, 0 = padding
    exclude_ids  INT64 [batch, -1]       model item ids that must not be returned, padded with 0
    top_ids      INT64 [batch, max_k]    best model item ids, best first
    top_scores   FP32  [batch, max_k]    their scores; EXCLUDED_SCORE or below marks a blocked slot

`metadata.json` beside each version's model.onnx maps model item ids to item ids (`vocabulary`).
"""

from typing import Final

ITEM_IDS: Final = "item_ids"
EVENT_TYPES: Final = "event_types"
EXCLUDE_IDS: Final = "exclude_ids"
TOP_IDS: Final = "top_ids"
TOP_SCORES: Final = "top_scores"
INPUTS: Final = (ITEM_IDS, EVENT_TYPES, EXCLUDE_IDS)
OUTPUTS: Final = (TOP_IDS, TOP_SCORES)
EXCLUDED_SCORE: Final = -1e9 / 2
"""Scores at or below this are padding, unknown or excluded items that filled a top-k slot."""
METADATA_FILE: Final = "metadata.json"
