"""Small helpers shared by the tests that call virtual services."""

from __future__ import annotations

from typing import Any

import grpc
import pytest


def fails(fn: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    """The RpcError a call raises (the test fails if it answers)."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value
