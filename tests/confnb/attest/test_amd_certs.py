"""The AMD certificates confnb ships: each is AMD's, chains to a pinned ARK, and lets a VEK alone verify offline."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from confnb.attest import Verifier, amd_certs
from confnb.attest.certs import AMD_ORGANIZATION, Role, load_certificates, profile_problems
from confnb.attest.errors import CertificateError
from confnb.attest.kds import KdsClient
from confnb.attest.report import Product
from confnb.attest.roots import PINNED_ARK_SHA256


@pytest.mark.parametrize("product", list(Product), ids=[product.value for product in Product])
@pytest.mark.parametrize("kind", ["vcek", "vlek"])
def test_every_shipped_certificate_chains_to_a_pinned_ark(product, kind):
    intermediate, ark = amd_certs.shipped_chain(product, kind)  # a pair for every product confnb knows
    assert PINNED_ARK_SHA256[ark.sha256] is product and ark.role is Role.ARK
    ark.certificate.verify_directly_issued_by(ark.certificate)
    intermediate.certificate.verify_directly_issued_by(ark.certificate)  # raises unless the ARK signed it
    assert intermediate.role is (Role.ASVK if kind == "vlek" else Role.ASK) and intermediate.product is product
    for cert, role in ((ark, Role.ARK), (intermediate, intermediate.role)):
        assert profile_problems(cert, role, AMD_ORGANIZATION) == []
        assert cert.certificate.not_valid_after_utc > datetime(2045, 1, 1, tzinfo=UTC)


def test_nine_certificates_three_per_product():
    names = sorted(cert.common_name for cert in amd_certs.shipped_certificates())
    assert names == sorted(f"{prefix}{p.value}" for p in Product for prefix in ("ARK-", "SEV-", "SEV-VLEK-"))


def test_a_shipped_certificate_that_does_not_match_its_digest_is_refused(monkeypatch):
    digest, encoded = amd_certs._SHIPPED["SEV-Genoa"]
    flipped = encoded.replace("A", "B", 1)
    monkeypatch.setitem(amd_certs._SHIPPED, "SEV-Genoa", (digest, flipped))
    amd_certs.shipped_certificate.cache_clear()
    try:
        with pytest.raises(CertificateError, match="does not match its SHA-256"):
            amd_certs.shipped_certificate("SEV-Genoa")
    finally:
        amd_certs.shipped_certificate.cache_clear()


def test_a_vek_alone_verifies_offline(vector, tmp_path):
    """``confnb attest verify --report r.bin --vek vcek.der --offline``: nothing but the VEK comes with the input."""
    leaf = next(cert for cert in load_certificates(vector.vek) if cert.role in (Role.VCEK, Role.VLEK))
    verifier = Verifier(KdsClient(cache_dir=tmp_path, offline=True))
    result = verifier.verify(vector.report, leaf.der, None, at=vector.inside_validity)
    assert result.ok, result.summary()
    assert "shipped with confnb" in result.check("certificates").detail
    assert not any(tmp_path.iterdir())  # nothing fetched, nothing cached


def test_a_vek_signed_by_another_key_gets_no_help_from_the_shipped_chain(shared_vectors):
    """The shipped ASK vouches only for VCEKs it signed: trustee's synthetic VCEK lookalike still fails."""
    report = (shared_vectors / "trustee/test_data_snp_test-report.bin").read_bytes()
    fake = (shared_vectors / "trustee/test_data_snp_test-vcek-invalid-legacy.der").read_bytes()
    result = Verifier(kds=None).verify(report, fake, None)
    assert "vek_signed_by_ask" in [check.name for check in result.failures]
    assert "shipped with confnb" in result.check("certificates").detail
