"""Invariant helpers: assertions that say what must hold, with a message that shows what did not."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import TypeVar

T = TypeVar("T")


def assert_exactly_once(seen: Iterable[Hashable], expected: Iterable[Hashable]) -> None:
    """Every expected item seen exactly once, and nothing else: no loss, no duplicate, no stranger."""
    counts = Counter(seen)
    expected_set = set(expected)
    duplicates = {item: n for item, n in counts.items() if n > 1}
    missing = expected_set - counts.keys()
    unexpected = counts.keys() - expected_set
    assert not (duplicates or missing or unexpected), (
        f"{len(missing)} missing (e.g. {sorted(map(str, missing))[:5]}), "
        f"{len(duplicates)} duplicated (e.g. {list(duplicates.items())[:5]}), "
        f"{len(unexpected)} unexpected (e.g. {sorted(map(str, unexpected))[:5]})"
    )


async def eventually(check: Callable[[], Awaitable[T | None]], timeout_s: float, what: str, interval_s: float = 0.2) -> T:
    """Poll `check` until it returns something other than None: waits on a condition, never a fixed sleep."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(interval_s)
