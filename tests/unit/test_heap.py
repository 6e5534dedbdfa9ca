"""Start-up objects leave the collector's scans; objects made afterwards are still collected."""

import gc
import weakref


def test_freezing_keeps_startup_objects_out_of_collections_but_still_collects_new_cycles() -> None:
    from vitrine.services.heap import freeze_startup_objects

    class Node:
        pass

    frozen_before = gc.get_freeze_count()
    try:
        startup = [Node() for _ in range(100)]
        assert all(gc.is_tracked(o) for o in startup)
        reported = freeze_startup_objects()
        # Every start-up object is now in the permanent generation: no generation the collector scans holds it.
        scanned = {id(o) for o in gc.get_objects()}
        still_scanned = sum(id(o) in scanned for o in startup)
        assert still_scanned == 0, f"{still_scanned} of {len(startup)} start-up objects are still in the collector's generations"
        assert reported == gc.get_freeze_count() >= frozen_before + len(startup)
        cycle = Node()
        cycle.self = cycle  # garbage made while serving: only the cyclic collector can free it
        ref = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert ref() is None
    finally:
        gc.unfreeze()
