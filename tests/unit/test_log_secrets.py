"""What a log line must never carry: a frame's local variables (a bearer token, a request body,
a file's contents) in an exception's traceback, and the caller's credential in the context an
apply hands to the admin RPCs."""

from __future__ import annotations

import io
import logging
from datetime import UTC, datetime

import pytest
import structlog

from control_plane.admin.convert import rfc3339
from control_plane.resources.apply import ApplyContext
from tessera.logging import configure_logging
from tessera.settings import LogSettings


@pytest.fixture
def restore_logging():
    """configure_logging sets process-wide state: put it back for the tests after this one."""
    config, root = structlog.get_config(), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**config)
    root.handlers[:], root.level = handlers, level


def test_an_exceptions_traceback_shows_no_local_variables(restore_logging):
    out = io.StringIO()
    configure_logging(LogSettings(format="json"), service="test", stream=out)

    def handler() -> None:
        authorization = "Bearer tadm_secret_token"  # noqa: F841 - a local a traceback could show
        raise ValueError("boom")

    try:
        handler()
    except ValueError:
        structlog.get_logger("test").exception("failed")
    line = out.getvalue()
    assert '"exc_type": "ValueError"' in line
    assert "tadm_secret_token" not in line


class _Context:
    def invocation_metadata(self):
        return (("authorization", "Bearer tadm_secret"), ("x-request-id", "req-1"))


def test_an_apply_passes_on_the_request_id_and_not_the_credential():
    inner = ApplyContext.of(_Context(), "tessera-apply")
    assert inner.invocation_metadata() == (("x-request-id", "req-1"),)
    fresh = ApplyContext.of(None, "config-dir").invocation_metadata()
    assert fresh[0][0] == "x-request-id"
    assert fresh[0][1].startswith("config-dir-")


def test_times_before_the_year_1000_keep_four_digits():
    assert rfc3339(datetime(999, 1, 1, tzinfo=UTC)) == "0999-01-01T00:00:00Z"
