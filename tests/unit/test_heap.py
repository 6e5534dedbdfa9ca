"""Start-up objects leave the collector's scans; objects made afterwards are still collected."""

import gc
import weakref


def test_freezing_keeps_startup_objects_out_of_collections_but_still_collects_new_cycles() -> None:
    from vitrine.services.heap import freeze_startup_objects

    class Node:
        pass

    try:
        startup = [Node() for _ in range(100)]
        assert freeze_startup_objects() >= 100
        assert not any(gc.is_tracked(o) and o in gc.get_objects(generation=2) for o in startup[:3])
        cycle = Node()
        cycle.self = cycle  # garbage made while serving: only the cyclic collector can free it
        ref = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert ref() is None
    finally:
        gc.unfreeze()
