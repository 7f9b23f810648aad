"""Workload identities: the CA, leaf certificates with SPIFFE IDs, files only their owner reads,
renewal past half a certificate's life."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from tessera.identity import LEAF_LIFETIME, Authority, spiffe_id, spiffe_ids
from tessera.settings import IdentitySettings


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_ca_is_created_once_private_and_loaded_again(tmp_path):
    first = Authority(tmp_path / "identity")
    assert _mode(tmp_path / "identity") == 0o700
    assert _mode(tmp_path / "identity" / "ca.key") == 0o600
    again = Authority(tmp_path / "identity")
    assert again.cert == first.cert  # loaded, not replaced: issued certificates stay valid
    constraints = first.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca


def test_a_leaf_names_its_spiffe_id_and_chains_to_the_ca(tmp_path):
    ca = Authority(tmp_path)
    files = ca.ensure("ext-authz", spiffe_id("ext-authz"))
    cert = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
    assert spiffe_ids(cert) == ["spiffe://tessera.local/ns/default/ext-authz"]
    assert cert.issuer == ca.cert.subject
    public = ca.cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca.cert)  # raises if the signature does not verify
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= LEAF_LIFETIME + dt.timedelta(minutes=5)
    assert (_mode(files.cert_file), _mode(files.key_file)) == (0o600, 0o600)
    assert spiffe_id("envoy", "prod", node="gw-1") == "spiffe://tessera.local/ns/prod/envoy/gw-1"


def test_a_certificate_is_renewed_past_half_its_life_and_not_before(tmp_path):
    ca = Authority(tmp_path)
    name = spiffe_id("ratelimit")
    files = ca.ensure("ratelimit", name)
    first = files.cert_file.read_bytes()
    now = dt.datetime.now(dt.UTC)
    assert ca.ensure("ratelimit", name, now=now + dt.timedelta(hours=11)).cert_file.read_bytes() == first
    renewed = ca.ensure("ratelimit", name, now=now + dt.timedelta(hours=13)).cert_file.read_bytes()
    assert renewed != first
    # Another identity asked of the same name, or a file that is not a certificate: issued anew.
    assert ca.ensure("ratelimit", spiffe_id("meter")).cert_file.read_bytes() != renewed
    files.cert_file.write_text("garbage")
    cert = x509.load_pem_x509_certificate(ca.ensure("ratelimit", name).cert_file.read_bytes())
    assert spiffe_ids(cert) == [name]


def test_a_new_ca_means_every_leaf_is_issued_again(tmp_path):
    """A CA whose files went missing is replaced; leaves of the old one are not kept (every CA
    has its own name, and the signature is checked, not the issuer's name)."""
    ca = Authority(tmp_path)
    files = ca.ensure("meter", spiffe_id("meter"))
    (tmp_path / "ca.key").unlink()
    replaced = Authority(tmp_path)
    assert replaced.cert.subject != ca.cert.subject
    cert = x509.load_pem_x509_certificate(replaced.ensure("meter", spiffe_id("meter")).cert_file.read_bytes())
    cert.verify_directly_issued_by(replaced.cert)
    assert files.cert_file.read_bytes() == cert.public_bytes(serialization.Encoding.PEM)


def test_a_ca_near_its_end_is_replaced_at_start(tmp_path):
    ca = Authority(tmp_path)
    end = ca.cert.not_valid_after_utc
    assert Authority(tmp_path, now=end - dt.timedelta(days=60)).cert == ca.cert
    assert Authority(tmp_path, now=end - dt.timedelta(days=10)).cert != ca.cert


def test_a_key_that_does_not_match_its_certificate_is_repaired(tmp_path):
    ca = Authority(tmp_path)
    files = ca.ensure("ratelimit", spiffe_id("ratelimit"))
    other = ca.ensure("meter", spiffe_id("meter"))
    files.key_file.write_bytes(other.key_file.read_bytes())  # a renewal cut between its two writes
    repaired = ca.ensure("ratelimit", spiffe_id("ratelimit"))
    cert = x509.load_pem_x509_certificate(repaired.cert_file.read_bytes())
    key = serialization.load_pem_private_key(repaired.key_file.read_bytes(), password=None)
    assert cert.public_key() == key.public_key()


def test_files_are_private_even_over_a_leftover_temp_file(tmp_path):
    ca = Authority(tmp_path)
    leftover = tmp_path / ".x.key.tmp"
    leftover.write_text("old")
    leftover.chmod(0o644)
    assert _mode(ca.ensure("x", spiffe_id("x")).key_file) == 0o600


def test_half_an_identity_is_a_configuration_error():
    with pytest.raises(ValidationError):
        IdentitySettings(cert_file=Path("c.pem"), key_file=Path("k.pem"))
    assert not IdentitySettings().enabled


def test_an_allow_list_entry_ending_in_a_slash_names_every_id_under_it():
    from tessera.grpc_server import permitted  # noqa: PLC0415
    from tessera.identity import envoy_nodes  # noqa: PLC0415

    allowed = frozenset({envoy_nodes("prod"), spiffe_id("meter", "prod")})
    assert permitted(spiffe_id("envoy", "prod", "gw-1"), allowed)
    assert permitted(spiffe_id("meter", "prod"), allowed)
    assert not permitted(spiffe_id("envoy", "other", "gw-1"), allowed)  # another namespace
    assert not permitted(spiffe_id("meter", "prod") + "x", allowed)  # exact entries are exact
    assert not permitted("spiffe://tessera.local/ns/prod/envoyx/gw", allowed)
    assert not permitted("", allowed)
