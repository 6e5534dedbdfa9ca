import json

import pytest

from vitrine.contracts.events import Event, EventRejected, EventType, parse_event

NOW_MS = 1_767_225_600_000
GOOD = {"event_id": "e-1", "user_id": "u1", "item_id": "i9", "type": "add_to_cart", "ts_ms": NOW_MS}


def test_a_valid_event_round_trips_through_its_wire_form() -> None:
    event = parse_event(json.dumps({**GOOD, "context": {"page": "pdp", "referrer_item_id": "i3"}}), now_ms=NOW_MS)
    assert event.type is EventType.ADD_TO_CART and event.context and event.context.page == "pdp"
    assert parse_event(event.to_json()) == event


def test_funnel_strength_orders_the_types() -> None:
    assert [t.strength for t in EventType] == [0, 1, 2, 3]
    assert EventType.PURCHASE.index == 4 and EventType.VIEW.index == 1  # 0 is padding for models


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not_json"),
        (b"[1, 2]", "not_json"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "item_id"}), "missing_field"),
        (json.dumps({**GOOD, "type": "wishlist"}), "unknown_type"),
        (json.dumps({**GOOD, "ts_ms": 1_767_225_600}), "absurd_timestamp"),  # seconds, not milliseconds
        (json.dumps({**GOOD, "ts_ms": NOW_MS + 3 * 86_400_000}), "absurd_timestamp"),
        (json.dumps({**GOOD, "user_id": "x" * 500}), "invalid_field"),
        (json.dumps({**GOOD, "user_id": "rm -rf /; echo"}), "invalid_field"),
        (json.dumps({**GOOD, "surprise": 1}), "invalid_field"),
    ],
)
def test_bad_input_is_rejected_with_a_reason(raw: bytes | str, reason: str) -> None:
    with pytest.raises(EventRejected) as error:
        parse_event(raw, now_ms=NOW_MS)
    assert error.value.reason == reason
    assert error.value.detail


def test_events_are_immutable() -> None:
    event = Event.model_validate(GOOD)
    with pytest.raises(Exception, match="frozen"):
        event.user_id = "other"  # type: ignore[misc]
