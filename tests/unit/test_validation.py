from __future__ import annotations

import pytest

from control_plane import validation as v
from tessera.errors import InvalidArgumentError


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("24h", 86400), ("1h30m", 5400)])
def test_go_durations(text, seconds):
    assert v.duration_seconds(text, "ttl") == seconds


@pytest.mark.parametrize("text", ["", "0s", "10", "1d", "h", "5m3", "-5m"])
def test_bad_durations_name_the_field(text):
    with pytest.raises(InvalidArgumentError, match=r"^ttl:"):
        v.duration_seconds(text, "ttl")


@pytest.mark.parametrize(
    ("url", "normal"),
    [("http://127.0.0.1:8000", "http://127.0.0.1:8000"), ("https://vllm.svc:443/", "https://vllm.svc:443")],
)
def test_backend_urls(url, normal):
    assert v.backend_url(url) == normal


@pytest.mark.parametrize(
    "url",
    [
        "127.0.0.1:8000",
        "ftp://h:1",
        "http://h",
        "http://h:1/v1",
        "http://u:p@h:1",
        "http://h:1?x=1",
        "http://h:99999",
    ],
)
def test_bad_backend_urls(url):
    with pytest.raises(InvalidArgumentError, match=r"^backend\.url:"):
        v.backend_url(url)


@pytest.mark.parametrize("name", ["acme", "a", "team-7"])
def test_tenant_names(name):
    assert v.tenant_name(name) == name


@pytest.mark.parametrize("name", ["", "Acme", "-x", "a" * 64, "a b", "a_b"])
def test_bad_tenant_names(name):
    with pytest.raises(InvalidArgumentError, match=r"^name:"):
        v.tenant_name(name)


def test_model_names_cannot_start_like_a_routing_sentinel():
    assert v.model_name("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    for bad in [":missing", ":invalid", "", "a" * 129, "x y"]:
        with pytest.raises(InvalidArgumentError):
            v.model_name(bad)


def test_pages_round_trip_and_reject_garbage():
    size, after = v.page(0, "")
    assert (size, after) == (v.DEFAULT_PAGE, "")
    token = v.next_token(2, 2, "ten_abc")
    assert v.page(2, token) == (2, "ten_abc")
    assert v.next_token(1, 2, "ten_abc") == ""
    assert v.page(10_000, "")[0] == v.MAX_PAGE
    with pytest.raises(InvalidArgumentError, match="page_token"):
        v.page(1, "!!!")
    with pytest.raises(InvalidArgumentError, match="page_size"):
        v.page(-1, "")
