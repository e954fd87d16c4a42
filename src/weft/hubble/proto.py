"""The generated Hubble stubs (``weft.hubble.gen``, made by ``make proto``), typed as modules
of Any: protoc's Python output is untyped, so this is the one place weft imports it."""

from __future__ import annotations

from typing import Any

try:
    from weft.hubble.gen.flow import flow_pb2 as _flow_pb2
    from weft.hubble.gen.observer import observer_pb2 as _observer_pb2
    from weft.hubble.gen.observer import observer_pb2_grpc as _observer_grpc
    from weft.hubble.gen.relay import relay_pb2 as _relay_pb2
except ImportError as exc:  # pragma: no cover - a checkout without `make install`
    raise ImportError(f"weft's Hubble stubs are missing ({exc}): run `make proto` (part of `make install`)") from exc

flow_pb2: Any = _flow_pb2
observer_pb2: Any = _observer_pb2
observer_grpc: Any = _observer_grpc
relay_pb2: Any = _relay_pb2

__all__ = ["flow_pb2", "observer_grpc", "observer_pb2", "relay_pb2"]
