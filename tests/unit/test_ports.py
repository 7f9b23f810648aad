"""Ports for the embedded stack: never twice, never one the caller named, never ephemeral."""

from __future__ import annotations

from tessera import ports


def test_free_ports_are_never_handed_out_twice_nor_from_the_ephemeral_range(monkeypatch):
    monkeypatch.setattr(ports, "LOWEST", 20_000)
    monkeypatch.setattr(ports, "_ephemeral_start", lambda: 21_100)  # 1,100 to pick from
    monkeypatch.setattr(ports, "_handed_out", set())
    ports.reserve(20_500)
    picked = [ports.free_port() for _ in range(300)]
    assert len(set(picked)) == len(picked)  # unbound yet, so only the record keeps them apart
    assert 20_500 not in picked
    assert all(20_000 <= p < 21_100 for p in picked)
