"""Envoy 1.40 config messages that neither envoy-data-plane 2.2.0 nor xds-protos 1.85 ship.

Each is written from the FileDescriptorProto embedded in the pinned Envoy binary (field
names and numbers as the binary defines them) and registered in envoy-data-plane's message
pool, so it can appear under ``"@type"`` in the dicts ``resources.py`` types.
"""

from __future__ import annotations

import betterproto2
from envoy_data_plane import google as _google  # noqa: F401 - registers the wrapper types
from envoy_data_plane.google.protobuf import UInt64Value
from envoy_data_plane.message_pool import default_message_pool
from pydantic.dataclasses import dataclass


@dataclass(eq=False, repr=False, config={"extra": "forbid"})
class BodySizeLimit(betterproto2.Message):
    """envoy.extensions.filters.http.body_size_limit.v3.BodySizeLimit (binary: field 1, UInt64Value)."""

    max_request_bytes: int | None = betterproto2.field(
        1, betterproto2.TYPE_MESSAGE, unwrap=lambda: UInt64Value, optional=True
    )


default_message_pool.register_message(
    "envoy.extensions.filters.http.body_size_limit.v3", "BodySizeLimit", BodySizeLimit
)
