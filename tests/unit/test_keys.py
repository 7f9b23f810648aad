from __future__ import annotations

import stat

import pytest

from tessera import keys
from tessera.errors import ConfigError


def test_minted_keys_are_unique_parseable_and_long():
    a, b = keys.mint_key(), keys.mint_key()
    assert a.key != b.key
    assert keys.parse_public_id(a.key) == a.public_id
    secret = a.key.rsplit("_", 1)[1] if a.key.count("_") == 2 else a.key[len("tsk_") + 13 :]
    assert len(a.key) - len(f"tsk_{a.public_id}_") == 43  # 32 random bytes, url-safe base64
    assert secret


def test_display_prefix_never_reveals_the_secret():
    k = keys.mint_key()
    prefix = keys.display_prefix(k.key)
    assert prefix.startswith(f"tsk_{k.public_id}_")
    assert len(prefix) == len(f"tsk_{k.public_id}_") + 4


@pytest.mark.parametrize(
    "bad", ["", "sk-123", "tsk_short_x", "tsk_AAAAAAAAAAAA_" + "x" * 43, "tsk_aaaaaaaaaaaa_" + "x" * 42]
)
def test_malformed_keys_have_no_public_id(bad):
    assert keys.parse_public_id(bad) is None


def test_digest_depends_on_pepper_and_key():
    k = keys.mint_key().key
    assert keys.digest(b"p" * 32, k) == keys.digest(b"p" * 32, k)
    assert keys.digest(b"p" * 32, k) != keys.digest(b"q" * 32, k)
    assert len(keys.digest(b"p" * 32, k)) == 32


def test_pepper_is_created_once_private(tmp_path):
    path = tmp_path / "d" / "pepper"
    first = keys.ensure_pepper(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.ensure_pepper(path) == first


def test_missing_or_short_pepper_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unreadable"):
        keys.load_pepper(tmp_path / "none")
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ConfigError, match="at least"):
        keys.load_pepper(tmp_path / "short")
