"""The ranker models' tensor contract, shared by the export step and the gateway.

Every ranker in the model repository takes a left-padded history and exclusions and returns top-k:

    item_ids     INT64 [batch, max_len]  model item ids, 0 = padding, 1 = unknown item
    event_types  INT64 [batch, max_len]  EventType.index of each step, 0 = padding
    exclude_ids  INT64 [batch, -1]       model item ids that must not be returned, padded with 0
    top_ids      INT64 [batch, max_k]    best model item ids, best first
    top_scores   FP32  [batch, max_k]    their scores; EXCLUDED_SCORE or below marks a blocked slot
    explain_steps INT64 [batch, max_k]   per returned item, the position (0..max_len-1) in item_ids of the history
                                         step that led to it (closest item vector), -1 when the history holds no
                                         known item. Optional: versions exported before it lack it (the committed
                                         v1 models); a model's Triton config declares it only when every version
                                         it serves has it, and clients ask for it only then.

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
"""The outputs every ranker version has."""
EXPLAIN_STEPS: Final = "explain_steps"
EXPLAINED_OUTPUTS: Final = (TOP_IDS, TOP_SCORES, EXPLAIN_STEPS)
"""The outputs of a version exported with explanations (every export since explain_steps exists)."""
NO_STEP: Final = -1


def declares_explain_steps(config: dict) -> bool:
    """Whether a Triton model config (`get_model_config(..., as_json=True)["config"]`) declares EXPLAIN_STEPS: the
    one test of "this model serves explanations" for every client (the gateway, the post-load check)."""
    return any(output.get("name") == EXPLAIN_STEPS for output in config.get("output", []))
EXCLUDED_SCORE: Final = -1e9 / 2
"""Scores at or below this are padding, unknown or excluded items that filled a top-k slot."""
METADATA_FILE: Final = "metadata.json"
