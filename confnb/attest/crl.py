"""Which certificates a CRL speaks for: AMD's ARK signs two CRLs per product, and each covers only its own path.

``https://kdsintf.amd.com/vcek/v1/<Product>/crl`` lists revoked ASKs (the VCEK path) and ``…/vlek/v1/<Product>/crl``
revoked ASVKs (the VLEK path). Both carry the same issuer and the same ARK signature, so a signature check cannot
tell them apart: a VCEK-path CRL given for a VLEK chain would pass and report "not revoked" about an ASVK it never
lists. Each ASK/ASVK names its CRL in its CRL distribution point, so the CRL must be shown to be the one published
there: by its own issuingDistributionPoint extension when it has one (signed, so authoritative), else by the URL it
was downloaded from. Without either, nothing shows what it covers, and the check fails closed.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from cryptography import x509

from confnb.attest.certs import Cert
from confnb.attest.result import Check, Outcome


def distribution_point(cert: Cert) -> str | None:
    """The one CRL distribution point URI of an AMD CA certificate (``cert_profile`` checks there is one)."""
    try:
        points = cert.certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return None
    uris = [
        name.value
        for point in points
        for name in point.full_name or ()
        if isinstance(name, x509.UniformResourceIdentifier)
    ]
    return uris[0] if len(uris) == 1 else None


def crl_scope(crl: x509.CertificateRevocationList, intermediate: Cert, downloaded_from: str | None) -> Check:
    """Does ``crl`` (already known to be ARK-signed) cover ``intermediate``, the chain's ASK or ASVK?"""
    name = intermediate.common_name
    expected = distribution_point(intermediate)
    if expected is None:
        return Check("crl_scope", Outcome.FAIL, f"{name} names no single CRL distribution point to hold the CRL to")
    try:
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound:
        idp = None
    if idp is not None:
        partial = [
            what
            for what, flag in (
                ("some reasons only", idp.only_some_reasons is not None),
                ("an indirect CRL", idp.indirect_crl),
                ("end-entity certificates only", idp.only_contains_user_certs),
                ("attribute certificates only", idp.only_contains_attribute_certs),
            )
            if flag
        ]
        if partial:
            return Check(
                "crl_scope",
                Outcome.FAIL,
                f"the CRL is partial ({', '.join(partial)}), so it cannot clear the CA certificate {name}",
            )
        published = [uri.value for uri in idp.full_name or () if isinstance(uri, x509.UniformResourceIdentifier)]
        if expected in published:
            return Check("crl_scope", Outcome.PASS, f"the CRL is the one published at {expected}, {name}'s")
        return Check(
            "crl_scope",
            Outcome.FAIL,
            f"the CRL is published at {', '.join(published) or 'no URI'}, not at {expected} where {name}'s "
            f"revocations are listed ({_path_kind(published)} CRL for a {_path_kind([expected])} chain)",
        )
    if downloaded_from is None:
        return Check(
            "crl_scope",
            Outcome.FAIL,
            f"the CRL names no issuingDistributionPoint and where it was downloaded from is not given, so nothing "
            f"shows it is {name}'s, published at {expected} (give its URL: --crl-url)",
        )
    if _same_resource(downloaded_from, expected):
        return Check("crl_scope", Outcome.PASS, f"the CRL was downloaded from {downloaded_from}, {name}'s")
    return Check(
        "crl_scope",
        Outcome.FAIL,
        f"the CRL was downloaded from {downloaded_from}, not from {expected} where {name}'s revocations are "
        f"listed ({_path_kind([downloaded_from])} CRL for a {_path_kind([expected])} chain)",
    )


def _same_resource(url: str, expected: str) -> bool:
    """The same CRL: the same path under KDS or under a mirror of it (``CONFNB_KDS_URL``), never another path."""
    wanted = urlsplit(expected).path
    path = urlsplit(url).path
    return bool(wanted) and (path == wanted or path.endswith(wanted))


def _path_kind(urls: list[str]) -> str:
    kinds = {"VLEK-path" if "/vlek/" in url else "VCEK-path" if "/vcek/" in url else "unknown" for url in urls}
    return " or ".join(sorted(kinds)) if kinds else "an unknown"
