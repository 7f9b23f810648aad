"""TLS at the gateway and certificate rotation (issue 14), on a `tessera up --tls --admin-rest
internal` stack: the official openai client over HTTPS with the gateway's CA (HTTP/1.1 and
HTTP/2 by ALPN), a client trusting another CA cannot connect, the admin REST API is off the
public listener, and every certificate (each workload identity and the gateway's) is issued again
twice during 100 requests a second for 30 s, JSON and streams, with no request failing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import httpx2
import openai
import pytest
from cryptography import x509

from tessera.identity import Authority, spiffe_id
from tests.e2e.conftest import Stack, start_stack, stop_stack
from tests.e2e.test_gateway import eventually

pytestmark = pytest.mark.envoy

RATE = 100  # requests a second
SECONDS = 30
ROTATIONS_AT = (8.0, 20.0)  # SIGUSR1: every certificate issued again
IDENTITIES = ("envoy", "ext-authz", "ratelimit", "meter", "control-plane", "supervisor", "operator")


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("tls"), "--tls", "--admin-rest", "internal")
    yield s
    stop_stack(s)


def _served_serial(stack: Stack, cafile: str | None = None) -> int:
    """The serial number of the certificate the gateway presents now (a new connection)."""
    ctx = ssl.create_default_context(cafile=cafile or stack.gateway_ca)
    with (
        socket.create_connection(("127.0.0.1", stack.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _serials(stack: Stack) -> dict[str, int]:
    directory = stack.root / "identity"
    return {
        name: x509.load_pem_x509_certificate((directory / f"{name}.pem").read_bytes()).serial_number
        for name in IDENTITIES
    }


def test_the_openai_client_over_https_with_http1_and_http2(tls_stack: Stack):
    assert tls_stack.gateway.startswith("https://")
    for http2, version in ((False, "HTTP/1.1"), (True, "HTTP/2")):
        client = tls_stack.client(tls_stack.demo_key, http2=http2)
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert raw.http_response.http_version == version
        assert raw.parse().choices[0].message.content
        chunks = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_a_client_trusting_another_ca_cannot_connect(tls_stack: Stack):
    # The internal CA exists beside it, but the gateway's certificate is from a CA of its own
    internal_ca = tls_stack.endpoints()["internal_ca"]
    client = openai.OpenAI(
        base_url=f"{tls_stack.gateway}/v1",
        api_key=tls_stack.demo_key,
        max_retries=0,
        http_client=openai.DefaultHttpx2Client(verify=ssl.create_default_context(cafile=internal_ca)),
    )
    with pytest.raises(openai.APIConnectionError):
        client.models.list()
    # and plain HTTP on the TLS port gets no answer
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{tls_stack.port}/v1/models", timeout=5)


def test_the_admin_rest_api_is_off_the_public_listener(tls_stack: Stack):
    token = json.loads((tls_stack.root / "admin.json").read_text())["token"]
    headers = {"authorization": f"Bearer {token}"}
    with httpx2.Client(verify=ssl.create_default_context(cafile=tls_stack.gateway_ca)) as http:
        # on the public listener /admin/ is no route: an API key gets 404, the admin token is no key
        public = http.get(f"{tls_stack.gateway}/admin/v1/tenants", headers=headers)
        assert public.status_code == 401
        assert "items" not in public.text
        keyed = {"authorization": f"Bearer {tls_stack.demo_key}"}
        assert http.get(f"{tls_stack.gateway}/admin/v1/tenants", headers=keyed).status_code == 404
        internal = http.get(f"{tls_stack.endpoints()['admin_rest']}/admin/v1/tenants", headers=headers)
        assert internal.status_code == 200
        assert "items" in internal.json()
        assert http.get(f"{tls_stack.endpoints()['admin_rest']}/admin/v1/tenants").status_code == 401


def test_the_openapi_document_is_on_the_admin_rest_listener_only(tls_stack: Stack):
    path = "/admin/v1/openapi.json"
    with httpx2.Client(verify=ssl.create_default_context(cafile=tls_stack.gateway_ca)) as http:
        internal = http.get(f"{tls_stack.endpoints()['admin_rest']}{path}")
        assert internal.status_code == 200
        assert internal.json()["paths"]["/admin/v1/tenants"]["get"]["operationId"] == "ListTenants"
        # anything else there is still the API's: no RPC, or a credential wanted
        assert http.get(f"{tls_stack.endpoints()['admin_rest']}{path}x").status_code == 404
        assert http.post(f"{tls_stack.endpoints()['admin_rest']}{path}").status_code == 404
        # the public listener has no admin route at all: ext_authz wants an API key
        assert http.get(f"{tls_stack.gateway}{path}").status_code == 401


async def _load(stack: Stack) -> tuple[int, list[str]]:
    """RATE requests a second for SECONDS (alternately JSON and streams, over HTTP/2 and
    HTTP/1.1); the supervisor gets SIGUSR1 at ROTATIONS_AT. (requests made, failures)."""
    ca = ssl.create_default_context(cafile=stack.gateway_ca)
    headers = {"authorization": f"Bearer {stack.demo_key}"}
    url = f"{stack.gateway}/v1/chat/completions"
    failures: list[str] = []
    supervisor = int(stack.endpoints()["supervisor_pid"])
    async with (
        httpx2.AsyncClient(verify=ca, http2=True, timeout=30) as h2,
        httpx2.AsyncClient(verify=ca, timeout=30, limits=httpx2.Limits(max_connections=200)) as h1,
    ):

        async def one(i: int) -> None:
            client = h2 if i % 2 else h1
            body = {"model": "demo", "messages": [{"role": "user", "content": f"r{i}"}], "max_tokens": 4}
            try:
                if i % 4 < 2:
                    resp = await client.post(url, json=body, headers=headers)
                    if resp.status_code != 200 or not resp.json()["choices"]:
                        failures.append(f"{i}: {resp.status_code} {resp.text[:200]}")
                    return
                async with client.stream("POST", url, json={**body, "stream": True}, headers=headers) as resp:
                    text = (await resp.aread()).decode()
                if resp.status_code != 200 or "data: [DONE]" not in text:
                    failures.append(f"{i} (stream): {resp.status_code} {text[:200]}")
            except httpx2.HTTPError as exc:
                failures.append(f"{i}: {type(exc).__name__} {exc}")

        start = time.monotonic()
        tasks = []
        rotations = list(ROTATIONS_AT)
        total = RATE * SECONDS
        for i in range(total):
            due = start + i / RATE
            if rotations and due - start >= rotations[0]:
                rotations.pop(0)
                os.kill(supervisor, signal.SIGUSR1)
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return total, failures


def test_every_certificate_rotates_under_load_with_no_failed_request(tls_stack: Stack):
    identities, gateway = _serials(tls_stack), _served_serial(tls_stack)
    log = tls_stack.root / "logs"
    reloads_before = sum(p.read_text().count("identity_reloaded") for p in log.glob("*.log"))
    made, failures = asyncio.run(_load(tls_stack))
    assert made == RATE * SECONDS
    assert failures == []
    # every identity was issued again, and each service picked its new one up
    after = _serials(tls_stack)
    assert all(after[n] != identities[n] for n in IDENTITIES), (identities, after)
    reloads = sum(p.read_text().count("identity_reloaded") for p in log.glob("*.log"))
    assert reloads > reloads_before
    # the gateway presents its new certificate to new connections (over SDS, within a refresh)
    deadline = time.monotonic() + 15
    while _served_serial(tls_stack) == gateway and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _served_serial(tls_stack) != gateway
    # Envoy took its renewed client certificate: new connections to ext_authz use it
    envoy = x509.load_pem_x509_certificate((tls_stack.root / "identity" / "envoy.pem").read_bytes())
    sds = json.loads((tls_stack.root / "identity" / "envoy-sds.json").read_text())
    inline = sds["resources"][0]["tls_certificate"]["certificate_chain"]["inline_string"]
    assert x509.load_pem_x509_certificate(inline.encode()).serial_number == envoy.serial_number


def test_a_renewal_caught_half_written_keeps_the_last_good_pair_and_a_killed_envoy_comes_back_with_the_new(
    tmp_path,
):
    """The gateway's certificate from files (--tls-cert/--tls-key), as cert-manager or an operator
    renews them: the new certificate beside the old key, garbage, the key missing. Each time the
    gateway keeps serving the last good pair; the completed renewal is served to new connections;
    Envoy SIGKILLed right after comes back (restarted by the supervisor) with the new one."""
    authority = Authority(tmp_path / "ca")
    ca = str(authority.cert_path)
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    first, second = (authority.issue(spiffe_id("gateway"), hosts=("127.0.0.1",)) for _ in range(2))
    cert_file.write_bytes(first[0])
    key_file.write_bytes(first[1])
    stack = start_stack(tmp_path / "stack", "--tls-cert", str(cert_file), "--tls-key", str(key_file))
    log = stack.root / "logs" / "control-plane.log"

    def serial_of(pem: bytes) -> int:
        return x509.load_pem_x509_certificate(pem).serial_number

    def served() -> int:
        return _served_serial(stack, ca)

    def answers() -> bool:
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        headers = {"authorization": f"Bearer {stack.demo_key}"}
        with httpx2.Client(verify=ssl.create_default_context(cafile=ca), timeout=10) as http:
            return (
                http.post(f"{stack.gateway}/v1/chat/completions", json=body, headers=headers).status_code
                == 200
            )

    def after_next(event: str, change: Callable[[], object]) -> None:
        """Make the change, then wait until the control plane has read the files and said so."""
        seen = log.read_text().count(event)
        change()
        eventually(lambda: log.read_text().count(event) > seen or 1 / 0, timeout=15, interval=0.2)

    try:
        assert served() == serial_of(first[0])
        after_next("gateway_certificate_mismatched", lambda: cert_file.write_bytes(second[0]))
        assert (served(), answers()) == (serial_of(first[0]), True)
        after_next(
            "gateway_certificate_mismatched",
            lambda: cert_file.write_bytes(b"-----BEGIN CERTIFICATE-----\nx\n"),
        )
        assert (served(), answers()) == (serial_of(first[0]), True)
        after_next("gateway_certificate_unreadable", key_file.unlink)
        assert (served(), answers()) == (serial_of(first[0]), True)
        cert_file.write_bytes(second[0])
        key_file.write_bytes(second[1])
        eventually(lambda: served() == serial_of(second[0]) or 1 / 0, timeout=15, interval=0.3)
        envoy = stack.endpoints()["pids"]["envoy"]
        os.kill(envoy, signal.SIGKILL)
        eventually(lambda: stack.endpoints()["pids"]["envoy"] != envoy or 1 / 0, timeout=15)
        eventually(
            lambda: (served(), answers()) == (serial_of(second[0]), True) or 1 / 0, timeout=30, interval=0.3
        )
        assert "PRIVATE KEY" not in log.read_text()  # the key never reaches a log line
    finally:
        stop_stack(stack)
