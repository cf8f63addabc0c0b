"""The fast proto3 JSON converter gives exactly what json_format.MessageToDict gives."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from virtsvc.contracts import Catalog
from virtsvc.scenarios.protojson import message_to_json

EXAMPLES = [
    ("shop.v1.Inventory/Reserve", {}),
    (
        "shop.v1.Inventory/Reserve",
        {"sku": "A", "qty": -3, "region": "REGION_EU", "holdFor": "1.5s", "labels": {"a": "b", "": "x"}},
    ),
    (
        "shop.v1.Payments/Charge",
        {
            "account": "a",
            "amount": {"currencyCode": "EUR", "units": "-9007199254740993"},
            "card": {"number": "4", "expMonth": 3},
            "metadata": {"k": [1, "x", None, {"y": True}]},
        },
    ),
    ("shop.v1.Payments/Charge", {"walletToken": "w", "metadata": {}}),
    (
        "shop.v1.Orders/PlaceOrder",
        {"customerId": "c", "lines": [{"sku": "A", "qty": 2}, {}], "signature": "AAEC/w==", "region": 7},
    ),
    ("shop.v1.Inventory/BulkUpdate", {"sku": "S", "count": "18446744073709551615"[:19], "warehouse": "w"}),
]


def _request(catalog: Catalog, method: str, data: dict[str, Any]) -> Any:
    spec = catalog.method(method)
    return json_format.ParseDict(data, spec.input_class(), descriptor_pool=catalog.pool)


def _reference(message: Any) -> Any:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, descriptor_pool=message.DESCRIPTOR.file.pool
    )


@pytest.mark.parametrize(("method", "data"), EXAMPLES)
def test_same_as_json_format(catalog: Catalog, method: str, data: dict[str, Any]) -> None:
    """Enums (known and unknown numbers), int64 as strings, bytes, maps, oneofs, Struct, Duration."""
    message = _request(catalog, method, data)
    assert message_to_json(message) == _reference(message)


def test_replies_with_nested_well_known_types(catalog: Catalog) -> None:
    """Timestamps, Any, floats, nested messages and maps of messages in output types too."""
    item = catalog.message_class("shop.v1.Item")()
    json_format.ParseDict(
        {
            "sku": "A",
            "onHand": "5",
            "availability": "IN_STOCK",
            "dimensions": {"widthCm": 0.1, "heightCm": 1e300},
            "tags": ["x", "y"],
            "stockByWarehouse": {"ams": "7"},
            "thumbnail": "AAA=",
            "audit": {"actor": "me", "createdAt": "2024-02-29T12:00:00.123Z"},
        },
        item,
        descriptor_pool=catalog.pool,
    )
    assert message_to_json(item) == _reference(item)


@settings(max_examples=200, deadline=None)
@given(
    sku=st.text(max_size=8),
    qty=st.integers(-(2**31), 2**31 - 1),
    region=st.integers(0, 5),
    labels=st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3),
    seconds=st.integers(0, 10**6),
)
def test_random_reserve_requests(
    catalog: Catalog, sku: str, qty: int, region: int, labels: dict[str, str], seconds: int
) -> None:
    """Any request the estate's Reserve can carry converts identically."""
    cls = catalog.method("shop.v1.Inventory/Reserve").input_class
    message = cls(sku=sku, qty=qty, region=region, labels=labels)
    if seconds:
        message.hold_for.seconds = seconds
    assert message_to_json(message) == _reference(message)
