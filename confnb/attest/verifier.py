"""The SEV-SNP verifier: authenticity (is this report from a genuine AMD chip?) then appraisal (is it *our* VM?).

Checks follow ``reference/snp.md`` §8, including the ones well-known verifiers get wrong: the ARK is pinned by
fingerprint rather than taken from the evidence; CHIP_ID is compared with the VCEK's hwID (only the first 8 bytes
for Turin, whose remaining 56 must be zero); the report's SIGNING_KEY must name the kind of certificate that
signed it; REPORTED/COMMITTED/CURRENT TCBs must be ordered; every certificate must be valid at the chosen time.

Everything that does not change between calls (parsed certificates, chain signatures) is memoised, so a warm
verification costs little more than the one ECDSA verification every report needs.
"""

from __future__ import annotations

import functools
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from confnb.attest.amd_certs import shipped_chain
from confnb.attest.appraisal import appraise
from confnb.attest.certs import (
    Cert,
    Role,
    load_certificates,
    parse_certificate,
    vek_extensions,
)
from confnb.attest.chain import ChainVerdict, appraise_chain
from confnb.attest.crl import crl_scope
from confnb.attest.errors import AttestInputError, CertificateError, KdsError
from confnb.attest.evidence import Evidence, report_data_for
from confnb.attest.inputs import load_certificate_input
from confnb.attest.kds import KdsClient
from confnb.attest.kds import crl_url as crl_url_for
from confnb.attest.policy import AttestationPolicy
from confnb.attest.report import SIGNED_SIZE, AttestationReport, FirmwareVersion, Product, SigningKey
from confnb.attest.result import Check, Outcome, VerificationResult
from confnb.attest.tcb import TcbLayout, TcbVersion

_ECDSA_SHA384 = ec.ECDSA(hashes.SHA384())


@functools.lru_cache(maxsize=128)
def _load_cached(data: bytes, what: str) -> tuple[Cert, ...]:
    return tuple(load_certificates(data, what))


@dataclass(frozen=True)
class _Chain:
    vek: Cert
    ask: Cert  # or ASVK, for a VLEK
    ark: Cert
    sources: tuple[str, ...]


class Verifier:
    """Holds the trust configuration (KDS access, cache); :meth:`verify` is safe to call from many threads."""

    def __init__(self, kds: KdsClient | None = None) -> None:
        self.kds = kds

    # -- public ---------------------------------------------------------------------------------------------

    def verify(
        self,
        report: bytes,
        vek: bytes | str | None = None,
        chain: bytes | str | None = None,
        policy: AttestationPolicy | str | Path | None = None,
        at: datetime | None = None,
        *,
        nonce: bytes | None = None,
        claims: dict[str, str] | None = None,
        crl: bytes | None = None,
        crl_url: str | None = None,
    ) -> VerificationResult:
        """Verify one report. Raises AttestInputError only for input that is not a report/certificate at all.

        ``crl_url`` is where ``crl`` was downloaded from, which says which certificates it covers when the CRL
        does not say so itself (an issuingDistributionPoint); see the ``crl_scope`` check.
        """
        moment = _utc(at)
        appraisal = _policy(policy)
        parsed = AttestationReport.parse(report)
        result = VerificationResult(report=parsed, claims=dict(claims or {}))
        result.checks += _format_checks(parsed.version, parsed.signature_algo, parsed.reserved_problems())
        signing_key = parsed.signing_key
        result.signing_key = signing_key.name if isinstance(signing_key, SigningKey) else f"reserved({signing_key})"

        chain_found = self._gather(parsed, _as_bytes(vek), _as_bytes(chain), result)
        if chain_found is not None:
            self._check_chain(parsed, report, chain_found, appraisal, moment, result, crl, crl_url)
        product = result.product or parsed.cpuid_product
        result.checks.append(
            _tcb_order(
                parsed.reported_tcb_raw,
                parsed.committed_tcb_raw,
                parsed.current_tcb_raw,
                parsed.tcb_layout(product),
                (parsed.committed_major, parsed.committed_minor, parsed.committed_build),
                (parsed.current_major, parsed.current_minor, parsed.current_build),
            )
        )
        if claims is not None or nonce is not None:
            self._check_binding(parsed, claims, nonce, result)
        if appraisal is not None:
            result.checks += appraise(
                parsed, appraisal, result.product or parsed.cpuid_product, result.signing_key, claims, moment
            )
            result.policy = {**appraisal.to_dict(), "source": appraisal.source, "digest": appraisal.digest()}
        return result

    def verify_evidence(
        self,
        evidence: Evidence | str | bytes,
        policy: AttestationPolicy | str | Path | None = None,
        at: datetime | None = None,
        *,
        nonce: bytes | None = None,
        crl: bytes | None = None,
        crl_url: str | None = None,
    ) -> VerificationResult:
        """Verify a ``confnb-evidence/1`` bundle: the report, its certificates, and the claims it binds."""
        if not isinstance(evidence, Evidence):
            evidence = Evidence.from_json(evidence)
        chain = "".join(evidence.chain).encode() if evidence.chain else None
        return self.verify(
            evidence.report,
            evidence.vek,
            chain,
            policy,
            at,
            nonce=nonce,
            claims=evidence.claims,
            crl=crl,
            crl_url=crl_url,
        )

    # -- certificates ---------------------------------------------------------------------------------------

    def _gather(
        self, report: AttestationReport, vek: bytes | None, chain: bytes | None, result: VerificationResult
    ) -> _Chain | None:
        """Find the VEK, ASK/ASVK and ARK: from the input first, then the cache, then KDS."""
        given = _given(vek, chain)
        leaf, pool, sources = given.leaf, given.pool, list(given.sources)

        wanted = report.signing_key
        turin_hint = report.version < 3 and not any(report.chip_id[8:]) and any(report.chip_id[:8])
        if leaf is not None:
            resolved = _resolve(given, report.cpuid_product, turin_hint)
            if resolved is not None:  # everything came with the input: the common, memoised case
                result.checks.append(resolved[1])
                return resolved[0]
        products = _candidate_products(report.cpuid_product, turin_hint, leaf, pool)
        if leaf is None:
            leaf, source, problem = self._fetch_vek(report, wanted, products)
            if leaf is None:
                result.checks.append(Check("certificates", Outcome.FAIL, problem))
                return None
            sources.append(source)

        product = products[0] if products else None
        issuer_role = Role.ASVK if leaf.role is Role.VLEK else Role.ASK
        ask = _pick(pool, issuer_role, product, leaf)
        ark = _pick(pool, Role.ARK, product)
        if (ask is None or ark is None) and product is not None:
            # AMD's ASK/ASVK and ARK ship with confnb (amd_certs): no cache or network needed for them.
            shipped = shipped_chain(product, "vlek" if issuer_role is Role.ASVK else "vcek")
            if shipped:
                ask = ask or _pick(shipped, issuer_role, product, leaf)
                ark = ark or _pick(shipped, Role.ARK, product)
                sources.append("ASK/ARK shipped with confnb")
        if (ask is None or ark is None) and product is not None:
            fetched = self._fetch_chain(product, "vlek" if issuer_role is Role.ASVK else "vcek")
            if fetched:
                ask = ask or _pick(tuple(fetched), issuer_role, product, leaf)
                ark = ark or _pick(tuple(fetched), Role.ARK, product)
                sources.append("ASK/ARK from cache or KDS")
        if ask is None or ark is None:
            missing = [name for name, cert in (("ASK/ASVK", ask), ("ARK", ark)) if cert is None]
            result.checks.append(
                Check(
                    "certificates",
                    Outcome.FAIL,
                    f"no {' or '.join(missing)} certificate for {product.value if product else 'an unknown product'}: "
                    "not in the input, among those confnb ships, in the cache, or reachable at KDS (pass --chain)",
                )
            )
            return None
        result.checks.append(
            Check(
                "certificates",
                Outcome.PASS,
                f"{leaf.common_name} <- {ask.common_name} <- {ark.common_name} ({', '.join(sources)})",
            )
        )
        return _Chain(leaf, ask, ark, tuple(sources))

    def _fetch_vek(
        self, report: AttestationReport, wanted: SigningKey | int, products: list[Product]
    ) -> tuple[Cert | None, str, str]:
        if wanted is SigningKey.VLEK:
            return (
                None,
                "",
                (
                    "no VLEK certificate: VLEKs are issued to the cloud provider and must come with "
                    "the evidence or --vek"
                ),
            )
        if wanted is not SigningKey.VCEK:
            return None, "", f"no VEK certificate, and SIGNING_KEY {wanted} names no key that can be fetched"
        if report.chip_id_masked:
            return None, "", "no VCEK certificate, and CHIP_ID is masked so KDS cannot be asked for one"
        if self.kds is None:
            return None, "", "no VCEK certificate given, and fetching from AMD KDS is disabled"
        errors = []
        for product in products or list(Product):
            try:
                der = self.kds.vcek(product, report.chip_id, report.reported_tcb(product))
            except KdsError as exc:
                errors.append(f"{product.value}: {exc}")
                continue
            return _load_cached(der, "VCEK from KDS")[0], "VCEK from cache or KDS", ""
        return None, "", "no VCEK certificate given; " + "; ".join(errors)

    def _fetch_chain(self, product: Product, key: str) -> list[Cert]:
        if self.kds is None:
            return []
        try:
            ders = self.kds.cert_chain(product, key)
        except KdsError:
            return []
        return [cert for der in ders for cert in _load_cached(der, "KDS certificate chain")]

    def _check_chain(
        self,
        report: AttestationReport,
        report_bytes: bytes,
        chain: _Chain,
        appraisal: AttestationPolicy | None,
        moment: datetime,
        result: VerificationResult,
        crl: bytes | None,
        crl_url: str | None,
    ) -> None:
        vek, ask, ark = chain.vek, chain.ask, chain.ark
        verdict = appraise_chain(vek, ask, ark, appraisal is not None and appraisal.allow_simulated)
        product = verdict.product
        result.product, result.simulated, result.vek = product, verdict.simulated, dict(verdict.summary)
        checks = result.checks
        checks += verdict.checks
        if verdict.simulated and appraisal is not None and appraisal.simulated_roots is not None:
            pinned = verdict.ark.sha256.lower() in appraisal.simulated_roots
            checks.append(
                Check(
                    "simulated_root",
                    Outcome.PASS if pinned else Outcome.FAIL,
                    f"SIMULATED root {verdict.ark.sha256[:16]}… "
                    + (
                        "is one the policy's simulated_roots names"
                        if pinned
                        else "is not one the policy's simulated_roots names (a simulated chip of someone else's)"
                    ),
                )
            )
        if verdict.valid_from <= moment <= verdict.valid_until:
            checks.append(verdict.validity_check)
        else:
            checks.append(Check("cert_validity", Outcome.FAIL, "; ".join(verdict.validity_problems(moment))))
        checks += _bindings(
            verdict,
            report.version,
            report.cpuid_fam_id,
            report.cpuid_mod_id,
            report.signing_key,
            report.reported_tcb_raw,
            report.chip_id,
            report.key_info.mask_chip_key,
        )
        checks.append(self._signature_check(report, report_bytes, verdict))
        if crl is not None or (appraisal is not None and appraisal.check_revocation):
            checks += self._revocation(crl, crl_url, ark, ask, vek, product, moment)

    @staticmethod
    def _signature_check(report: AttestationReport, report_bytes: bytes, verdict: ChainVerdict) -> Check:
        padding_problems = report.signature_padding_problems()
        if padding_problems:
            return Check("report_signature", Outcome.FAIL, "; ".join(padding_problems))
        key, name = verdict.public_key, verdict.vek.common_name
        if key is None or key.curve.name != "secp384r1":
            return Check("report_signature", Outcome.FAIL, "VEK key is not ECDSA P-384")
        signature = encode_dss_signature(report.signature_r, report.signature_s)
        try:
            key.verify(signature, report_bytes[:SIGNED_SIZE], _ECDSA_SHA384)
        except InvalidSignature:
            return Check(
                "report_signature",
                Outcome.FAIL,
                f"ECDSA P-384 signature over bytes 0x000-0x29F does not verify with {name}",
            )
        return Check("report_signature", Outcome.PASS, f"ECDSA P-384/SHA-384 verified with {name}")

    def _revocation(
        self,
        crl_der: bytes | None,
        crl_url: str | None,
        ark: Cert,
        ask: Cert,
        vek: Cert,
        product: Product | None,
        moment: datetime,
    ) -> list[Check]:
        """``crl_scope`` (when the CRL is ARK-signed) and ``revocation``: is the ASK/ASVK or the VEK revoked?"""
        if crl_der is None:
            if self.kds is None or product is None:
                return [Check("revocation", Outcome.FAIL, "revocation check required but no CRL is available")]
            kind = "vlek" if ask.role is Role.ASVK else "vcek"
            try:
                crl_der = self.kds.crl(product, kind)
            except KdsError as exc:
                return [
                    Check("revocation", Outcome.FAIL, f"revocation check required but the CRL is unavailable: {exc}")
                ]
            crl_url = crl_url_for(self.kds.base_url, product, kind)  # fetched for this chain: its scope is known
        try:
            crl = x509.load_der_x509_crl(crl_der)
        except ValueError:
            try:
                crl = x509.load_pem_x509_crl(crl_der)
            except ValueError:
                raise AttestInputError("CRL: neither DER nor PEM") from None
        ark_key = ark.certificate.public_key()
        if crl.issuer != ark.subject or not crl.is_signature_valid(ark_key):  # type: ignore[arg-type]
            return [Check("revocation", Outcome.FAIL, f"CRL is not signed by {ark.common_name}")]
        scope = crl_scope(crl, ask, crl_url)
        if not scope.ok:
            return [
                scope,
                Check(
                    "revocation",
                    Outcome.FAIL,
                    f"unknown: the CRL given does not cover {ask.common_name} (see crl_scope)",
                ),
            ]
        next_update = crl.next_update_utc
        if next_update is not None and next_update < moment:
            return [
                scope,
                Check("revocation", Outcome.FAIL, f"CRL expired {next_update:%Y-%m-%d} (next update passed)"),
            ]
        revoked = [
            cert.common_name
            for cert in (ask, vek)
            if crl.get_revoked_certificate_by_serial_number(cert.certificate.serial_number) is not None
        ]
        return [
            scope,
            _check(
                "revocation",
                not revoked,
                f"revoked: {', '.join(revoked)}" if revoked else f"not revoked (CRL of {crl.last_update_utc:%Y-%m-%d})",
            ),
        ]

    # -- report-level checks that need no certificate -------------------------------------------------------

    @staticmethod
    def _check_binding(
        report: AttestationReport,
        claims: dict[str, str] | None,
        nonce: bytes | None,
        result: VerificationResult,
    ) -> None:
        add = result.checks.append
        if claims is not None:
            expected = report_data_for(claims)
            bound = hmac.compare_digest(report.report_data, expected)
            add(
                _check(
                    "report_data_binding",
                    bound,
                    "REPORT_DATA = SHA-512 of the canonical claims"
                    if bound
                    else "REPORT_DATA is not SHA-512 of the claims: the claims were not made in this VM",
                )
            )
            if nonce is not None:
                given = claims.get("nonce", "")
                fresh = hmac.compare_digest(given.lower().encode(), nonce.hex().encode())
                add(
                    _check(
                        "nonce",
                        fresh,
                        "claims carry the expected nonce"
                        if fresh
                        else "the claims' nonce is not the one this verifier asked for (replayed evidence?)",
                    )
                )
        elif nonce is not None:
            fresh = hmac.compare_digest(report.report_data, nonce.ljust(64, b"\0"))
            add(
                _check(
                    "nonce",
                    fresh,
                    "REPORT_DATA is the expected nonce"
                    if fresh
                    else "REPORT_DATA is not the expected nonce (zero-padded to 64 bytes)",
                )
            )


# -- report-side checks, memoised on the fields they read ---------------------------------------------------


@functools.lru_cache(maxsize=256)
def _format_checks(version: int, signature_algo: int, problems: tuple[str, ...]) -> tuple[Check, ...]:
    """report_format, reserved_fields, signature_algorithm (memoised)."""
    return (
        Check("report_format", Outcome.PASS, f"version {version}, 1184 bytes"),
        Check("reserved_fields", Outcome.FAIL, "; ".join(problems))
        if problems
        else Check("reserved_fields", Outcome.PASS, "all must-be-zero fields are zero"),
        Check("signature_algorithm", Outcome.PASS, "ECDSA P-384 with SHA-384")
        if signature_algo == 1
        else Check(
            "signature_algorithm",
            Outcome.FAIL,
            f"SIGNATURE_ALGO is {signature_algo}, only 1 (ECDSA P-384/SHA-384) exists",
        ),
    )


@functools.lru_cache(maxsize=512)
def _bindings(
    verdict: ChainVerdict,
    version: int,
    family: int | None,
    model: int | None,
    signing_key: SigningKey | int,
    reported_raw: bytes,
    chip_id: bytes,
    mask_chip_key: bool,
) -> tuple[Check, Check, Check, Check]:
    """How the report binds to its chain: product, key type, TCB and chip (memoised on the fields they read)."""
    vek, product = verdict.vek, verdict.product
    return (
        _product_check(version, family, model, verdict.extensions.product, verdict.ask.product, product),
        _key_type_check(signing_key, vek, verdict.ask),
        _tcb_binding(reported_raw, vek.der, product),
        _chip_binding(chip_id, mask_chip_key, vek.der, product),
    )


def _product_check(
    version: int,
    family: int | None,
    model: int | None,
    vek_product: Product | None,
    intermediate: Product | None,
    product: Product | None,
) -> Check:
    if product is None:
        return Check("product", Outcome.FAIL, "the root names no product AMD publishes a pinned root for")
    claims = {"root": product, "intermediate": intermediate, "VEK productName": vek_product}
    if version >= 3:
        claims["report CPUID"] = Product.from_cpuid(family or 0, model or 0)
    disagree = [
        f"{name} says {value.value if value else 'unknown'}" for name, value in claims.items() if value is not product
    ]
    if disagree:
        return Check("product", Outcome.FAIL, f"expected {product.value} throughout; " + ", ".join(disagree))
    cpuid = "" if family is None else f" (CPUID family {family:#x} model {model or 0:#x})"
    return Check("product", Outcome.PASS, f"{product.value}{cpuid}")


def _key_type_check(key: SigningKey | int, vek: Cert, ask: Cert) -> Check:
    expected = {SigningKey.VCEK: (Role.VCEK, Role.ASK), SigningKey.VLEK: (Role.VLEK, Role.ASVK)}.get(
        key if isinstance(key, SigningKey) else SigningKey.NONE
    )
    if expected is None:
        return Check("signing_key_type", Outcome.FAIL, f"SIGNING_KEY is {key!r}: neither VCEK nor VLEK")
    if (vek.role, ask.role) != expected:
        name = key.name if isinstance(key, SigningKey) else key
        return Check(
            "signing_key_type",
            Outcome.FAIL,
            f"report says {name} but the leaf is {vek.common_name} under {ask.common_name}",
        )
    return Check("signing_key_type", Outcome.PASS, f"{expected[0].value} under {ask.common_name}")


def _tcb_binding(reported_raw: bytes, vek_der: bytes, product: Product | None) -> Check:
    reported = TcbVersion.decode(reported_raw, product.tcb_layout if product else TcbLayout.LEGACY)
    certified = vek_extensions(vek_der).tcb_components()
    mine = reported.components()
    if mine.keys() != certified.keys():
        return Check(
            "tcb_binding", Outcome.FAIL, f"REPORTED_TCB has {sorted(mine)} but the VEK certifies {sorted(certified)}"
        )
    differences = reported.differences(certified)
    if differences:
        return Check("tcb_binding", Outcome.FAIL, "REPORTED_TCB differs from the VEK's TCB: " + ", ".join(differences))
    return Check("tcb_binding", Outcome.PASS, f"REPORTED_TCB {reported} equals the VEK's TCB")


def _chip_binding(chip_id: bytes, mask_chip_key: bool, vek_der: bytes, product: Product | None) -> Check:
    vek, ext = parse_certificate(vek_der), vek_extensions(vek_der)
    if vek.role is Role.VLEK:
        return Check(
            "chip_binding", Outcome.SKIP, f"VLEKs carry no hwID (issued to {ext.csp_id or 'a cloud provider'})"
        )
    if ext.hw_id is None:
        return Check("chip_binding", Outcome.FAIL, "VCEK has no hwID to compare CHIP_ID with")
    if not any(chip_id):
        if mask_chip_key:
            return Check(
                "chip_binding", Outcome.SKIP, "CHIP_ID masked (MASK_CHIP_KEY): the VCEK signature alone binds the chip"
            )
        return Check("chip_binding", Outcome.FAIL, "CHIP_ID is all zero but MASK_CHIP_KEY is not set")
    if len(ext.hw_id) == 8:
        if product is not Product.TURIN:
            return Check("chip_binding", Outcome.FAIL, "8-byte hwID on a VCEK that is not Turin")
        if hmac.compare_digest(chip_id[:8], ext.hw_id) and not any(chip_id[8:]):
            return Check("chip_binding", Outcome.PASS, "CHIP_ID[0:8] equals the Turin hwID and CHIP_ID[8:64] is zero")
        return Check(
            "chip_binding",
            Outcome.FAIL,
            f"CHIP_ID {chip_id.hex()} is not the Turin hwID {ext.hw_id.hex()} followed by 56 zero bytes",
        )
    if hmac.compare_digest(chip_id, ext.hw_id):
        return Check("chip_binding", Outcome.PASS, "CHIP_ID equals the VCEK's hwID")
    return Check(
        "chip_binding",
        Outcome.FAIL,
        f"CHIP_ID {chip_id.hex()[:16]}… is not the VCEK's hwID {ext.hw_id.hex()[:16]}…",
    )


@functools.lru_cache(maxsize=512)
def _tcb_order(
    reported_raw: bytes,
    committed_raw: bytes,
    current_raw: bytes,
    layout: TcbLayout,
    committed_firmware: tuple[int, int, int],
    current_firmware: tuple[int, int, int],
) -> Check:
    """REPORTED <= COMMITTED <= CURRENT, component-wise, and no committed firmware newer than the running one."""
    reported, committed, current = (
        TcbVersion.decode(raw, layout) for raw in (reported_raw, committed_raw, current_raw)
    )
    problems = [f"REPORTED > COMMITTED ({p})" for p in committed.shortfalls(reported.components())]
    problems += [f"COMMITTED > CURRENT ({p})" for p in current.shortfalls(committed.components())]
    committed_version, current_version = FirmwareVersion(*committed_firmware), FirmwareVersion(*current_firmware)
    if committed_firmware > current_firmware:
        problems.append(f"committed firmware {committed_version} is newer than the running {current_version}")
    if problems:
        return Check("tcb_order", Outcome.FAIL, "; ".join(problems))
    return Check("tcb_order", Outcome.PASS, f"REPORTED <= COMMITTED <= CURRENT TCB; firmware {current_version}")


# -- helpers ------------------------------------------------------------------------------------------------


def _check(name: str, passed: bool, detail: str) -> Check:
    return Check(name, Outcome.PASS if passed else Outcome.FAIL, detail)


@dataclass(frozen=True, eq=False)  # compared by identity: instances come from the memoised _given()
class _Given:
    leaf: Cert | None
    pool: tuple[Cert, ...]
    sources: tuple[str, ...]


@functools.lru_cache(maxsize=128)
def _given(vek: bytes | None, chain: bytes | None) -> _Given:
    """Sort the certificates a caller supplied into the leaf (VCEK/VLEK) and the rest (memoised)."""
    pool: list[Cert] = []
    sources: list[str] = []
    leaf: Cert | None = None
    if vek:
        certs = load_certificate_input(vek, "VEK certificate")
        leaves = [cert for cert in certs if cert.role in (Role.VCEK, Role.VLEK)]
        leaf = leaves[0] if leaves else certs[0]
        pool.extend(cert for cert in certs if cert is not leaf)
        sources.append("VEK given")
    if chain:
        pool.extend(load_certificate_input(chain, "certificate chain"))
        sources.append("chain given")
    if leaf is None:
        leaf = next((cert for cert in pool if cert.role in (Role.VCEK, Role.VLEK)), None)
    return _Given(leaf, tuple(pool), tuple(sources))


@functools.lru_cache(maxsize=256)
def _resolve(given: _Given, cpuid_product: Product | None, turin_hint: bool) -> tuple[_Chain, Check] | None:
    """The chain and its ``certificates`` check when the input alone supplies all three certificates."""
    leaf, pool = given.leaf, given.pool
    if leaf is None:
        return None
    products = _candidate_products(cpuid_product, turin_hint, leaf, pool)
    product = products[0] if products else None
    ask = _pick(pool, Role.ASVK if leaf.role is Role.VLEK else Role.ASK, product, leaf)
    ark = _pick(pool, Role.ARK, product)
    if ask is None or ark is None:
        return None
    check = Check(
        "certificates",
        Outcome.PASS,
        f"{leaf.common_name} <- {ask.common_name} <- {ark.common_name} ({', '.join(given.sources)})",
    )
    return _Chain(leaf, ask, ark, given.sources), check


@functools.lru_cache(maxsize=256)
def _pick(certs: tuple[Cert, ...], role: Role, product: Product | None, child: Cert | None = None) -> Cert | None:
    """The certificate of ``role`` for ``product`` (and, given a child, the one that issued it); memoised."""
    candidates = [cert for cert in certs if cert.role is role]
    if child is not None:
        # The issuer is the certificate whose subject is the child's issuer name.
        named = [cert for cert in candidates if cert.subject == child.issuer]
        candidates = named or candidates
    if product is not None:
        candidates = [cert for cert in candidates if cert.product is product] or candidates
    return candidates[0] if candidates else None


@functools.lru_cache(maxsize=256)
def _candidate_products(
    cpuid_product: Product | None, turin_hint: bool, leaf: Cert | None, pool: tuple[Cert, ...]
) -> list[Product]:
    """The product to try first: the report's CPUID (v3+), else the VEK's productName, else the chain's names."""
    found: list[Product] = []
    if cpuid_product:
        found.append(cpuid_product)
    if leaf is not None:
        try:
            ext_product = vek_extensions(leaf.der).product
        except CertificateError:
            ext_product = None
        if ext_product:
            found.append(ext_product)
    found += [cert.product for cert in pool if cert.product]
    if not found and turin_hint:
        found.append(Product.TURIN)  # v2 carries no product: an 8-byte chip id is Turin's signature
    return list(dict.fromkeys(found))


def _utc(at: datetime | None) -> datetime:
    if at is None:
        return datetime.now(UTC)
    if at.tzinfo is None:
        raise AttestInputError("the verification time must carry a time zone (e.g. 2026-01-01T00:00:00Z)")
    return at.astimezone(UTC)


def _policy(policy: AttestationPolicy | str | Path | None) -> AttestationPolicy | None:
    if policy is None or isinstance(policy, AttestationPolicy):
        return policy
    return AttestationPolicy.load(policy)


def _as_bytes(value: bytes | str | None) -> bytes | None:
    if value is None:
        return None
    return value.encode("ascii", "replace") if isinstance(value, str) else bytes(value)


_default_verifier: Verifier | None = None


def default_verifier() -> Verifier:
    """A process-wide verifier using the default KDS client (cache, env-configured URL and offline mode)."""
    global _default_verifier  # noqa: PLW0603 - one shared, lazily built instance keeps caches warm
    if _default_verifier is None:
        _default_verifier = Verifier(KdsClient())
    return _default_verifier


def verify(
    report: bytes,
    vek: bytes | None = None,
    chain: bytes | None = None,
    policy: AttestationPolicy | str | Path | None = None,
    at: datetime | None = None,
    **options: Any,
) -> VerificationResult:
    """Verify one SEV-SNP report (see :meth:`Verifier.verify`)."""
    return default_verifier().verify(report, vek, chain, policy, at, **options)


def verify_evidence(
    evidence: Evidence | str | bytes,
    policy: AttestationPolicy | str | Path | None = None,
    at: datetime | None = None,
    **options: Any,
) -> VerificationResult:
    """Verify a ``confnb-evidence/1`` bundle (see :meth:`Verifier.verify_evidence`)."""
    return default_verifier().verify_evidence(evidence, policy, at, **options)
