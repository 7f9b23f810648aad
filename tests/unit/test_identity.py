"""Workload identities: the CA, leaf certificates with SPIFFE IDs, files only their owner reads,
renewal past half a certificate's life."""

from __future__ import annotations

import datetime as dt
import stat

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tessera.identity import LEAF_LIFETIME, Authority, spiffe_id, spiffe_ids


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
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert spiffe_ids(cert) == ["spiffe://tessera.local/ns/default/ext-authz"]
    assert cert.issuer == ca.cert.subject
    public = ca.cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca.cert)  # raises if the signature does not verify
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= LEAF_LIFETIME + dt.timedelta(minutes=5)
    assert (_mode(files.cert), _mode(files.key)) == (0o600, 0o600)
    assert spiffe_id("envoy", "prod", node="gw-1") == "spiffe://tessera.local/ns/prod/envoy/gw-1"


def test_a_certificate_is_renewed_past_half_its_life_and_not_before(tmp_path):
    ca = Authority(tmp_path)
    name = spiffe_id("ratelimit")
    files = ca.ensure("ratelimit", name)
    first = files.cert.read_bytes()
    now = dt.datetime.now(dt.UTC)
    assert ca.ensure("ratelimit", name, now=now + dt.timedelta(hours=11)).cert.read_bytes() == first
    renewed = ca.ensure("ratelimit", name, now=now + dt.timedelta(hours=13)).cert.read_bytes()
    assert renewed != first
    # Another identity asked of the same name, or a file that is not a certificate: issued anew.
    assert ca.ensure("ratelimit", spiffe_id("meter")).cert.read_bytes() != renewed
    files.cert.write_text("garbage")
    cert = x509.load_pem_x509_certificate(ca.ensure("ratelimit", name).cert.read_bytes())
    assert spiffe_ids(cert) == [name]
