"""Item → category, pluggable: the per-category slices of the evaluation need to know what an item is.

A category function maps item ids to category names ("" = unknown). Which one applies is configured
(`pipeline.category_source`); for a source nobody wrote a function for, the category slice family is
skipped and the run record says so — better no slice than a made-up one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache

import numpy as np

from vitrine.export.data.sequences import Dataset
from vitrine.settings import PipelineSettings

CategoryOf = Callable[[np.ndarray], np.ndarray]
"""Item ids (str array) → category names (str array, "" where unknown)."""
SYNTHETIC_ITEM = re.compile(r"^i(\d{1,9})$")


@lru_cache(maxsize=4)
def _synthetic_categories(preset: str, seed: int) -> np.ndarray:
    from vitrine.export.data import synthetic

    return synthetic.storefront(synthetic.preset(preset, seed=seed)).category


def synthetic_categories(preset: str, seed: int) -> CategoryOf:
    """The synthetic storefront's "i<n>" ids: item n's category from `synthetic.storefront()` (same preset and seed)."""
    categories = _synthetic_categories(preset, seed)

    def category_of(items: np.ndarray) -> np.ndarray:
        out = []
        for item in items.tolist():
            match = SYNTHETIC_ITEM.match(item)
            number = int(match.group(1)) if match else -1
            out.append(f"c{int(categories[number]):02d}" if 0 <= number < len(categories) else "")
        return np.array(out, dtype=str)

    return category_of


def category_function(settings: PipelineSettings) -> tuple[CategoryOf | None, str]:
    """The configured category function, or None with the reason the family is skipped."""
    if settings.category_source == "synthetic":
        return synthetic_categories(settings.category_preset, settings.category_seed), \
            f"synthetic storefront {settings.category_preset!r} seed {settings.category_seed}"
    return None, f"category slices skipped: no category function for source {settings.category_source!r}"


def with_categories(dataset: Dataset, category_of: CategoryOf | None) -> tuple[Dataset, str]:
    """The dataset with each validation target's category (what `metrics.slice_masks` slices by)."""
    if category_of is None or dataset.valid_target_ids is None:
        return dataset, "skipped"
    categories = category_of(dataset.valid_target_ids)
    known = float(np.mean(categories != "")) if len(categories) else 0.0
    if known == 0.0:
        return dataset, "skipped: no target item has a known category (unknown item ids for this source)"
    return replace(dataset, valid_target_category=categories), f"{known:.0%} of targets categorised"
