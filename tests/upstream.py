"""A demo upstream process (the stand-in for a GPU model server) for the routing tests."""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from tests.conftest import free_port

START_TIMEOUT = 15.0


class Upstream:
    """``tls``: (certificate chain PEM file, key PEM file, CA PEM file that signed it)."""

    def __init__(
        self, model: str, name: str, *, fail_status: int = 0, tls: tuple[str, str, str] | None = None
    ) -> None:
        self.port, self.name = free_port(), name
        argv = [sys.executable, "-m", "tessera.demo_upstream", "--port", str(self.port)]
        argv += ["--model", model, "--name", name, "--fail-status", str(fail_status)]
        self._ssl: ssl.SSLContext | None = None
        if tls is not None:
            argv += ["--tls-cert", tls[0], "--tls-key", tls[1]]
            self._ssl = ssl.create_default_context(cafile=tls[2])
            self._ssl.check_hostname = False  # the test reaches it by IP; Envoy checks the name
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if time.monotonic() > deadline:
                raise TimeoutError(f"demo upstream {name} did not start within {START_TIMEOUT}s")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"{'https' if self._ssl else 'http'}://127.0.0.1:{self.port}"

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.url}/health", timeout=1, context=self._ssl)  # noqa: S310
        except urllib.error.HTTPError:
            return True  # a failing upstream answers, with its error
        except OSError:
            return False
        return True

    def requests(self) -> list[dict[str, Any]]:
        """What it received (headers and body), oldest first."""
        with urllib.request.urlopen(f"{self.url}/debug/requests", timeout=5, context=self._ssl) as resp:  # noqa: S310
            return list(json.loads(resp.read())["requests"])

    def stop(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
