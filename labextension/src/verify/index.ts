/**
 * The browser's own verification of a kernel's `confnb-evidence/1` bundle.
 *
 * The Jupyter server verifies the same evidence, but the server is exactly what a confidential kernel must not
 * have to trust: a compromised server could say "verified" about anything. So the browser checks, with nothing
 * but WebCrypto and the pinned AMD roots, that the nonce it chose is in the claims, that REPORT_DATA commits to
 * the claims, and that an AMD chip (or, if the user allowed it, the simulated TEE) signed the report.
 */

import { canonicalJson } from '../canonical';
import { bytesEqual, exactBuffer, fromBase64, fromHex } from './bytes';
import {
  type CertificateChain,
  type ParsedCertificate,
  SIMULATED_ORGANIZATION,
  assembleChain,
  checkValidity,
  loadCertificates,
  verifyIssuedBy,
  vekPublicKey
} from './certs';
import {
  type DecodedReport,
  type Product,
  REPORT_SIZE,
  SIGNED_SIZE,
  decodeReport,
  signatureComponent
} from './report';
import { signaturePaddingProblems } from './report';
import { pinnedProduct } from './roots';
import {
  type BrowserVerdict,
  type Check,
  type EvidenceBundle,
  type VerifyOptions,
  fail,
  firstLine,
  pass
} from './types';

export { AMD_ARK_FINGERPRINTS, pinnedProduct } from './roots';
export { assembleChain, loadCertificates, parseCertificate } from './certs';
export type { CertificateChain, ParsedCertificate } from './certs';
export { decodeReport } from './report';
export type { DecodedReport, Product, TcbVersion } from './report';
export type {
  BrowserVerdict,
  Check,
  EvidenceBundle,
  Outcome,
  VerifyOptions
} from './types';

export const EVIDENCE_FORMAT = 'confnb-evidence/1';
/** The chain checks, in the order they are reported. */
export const CHAIN_CHECKS = [
  'ark_pinned',
  'ark_self_signed',
  'ask_signed_by_ark',
  'vek_signed_by_ask',
  'certificate_validity'
] as const;
const MAX_NONCE_BYTES = 64;

export type ChainOptions = {
  now?: Date;
  simulatedRoots?: string[];
  allowSimulated?: boolean;
};

export type ChainVerdict = {
  ok: boolean;
  /** The root is not AMD's but a simulated TEE's (named in simulatedRoots, or carrying its organisation). */
  simulated: boolean;
  /** The product of the pinned AMD root, if the root is one. */
  product: Product | null;
  checks: Check[];
};

function trustAnchor(
  ark: ParsedCertificate,
  options: ChainOptions
): { check: Check; simulated: boolean } {
  const amd = pinnedProduct(ark.sha256);
  if (amd) {
    return {
      check: pass(
        'ark_pinned',
        `ARK-${amd} matches AMD's pinned root sha256 ${ark.sha256}`
      ),
      simulated: false
    };
  }
  const listed = (options.simulatedRoots ?? []).some(
    root => root.toLowerCase() === ark.sha256
  );
  const simulated = listed || ark.organization === SIMULATED_ORGANIZATION;
  if (listed && options.allowSimulated) {
    return {
      check: pass(
        'ark_pinned',
        `SIMULATED root ${ark.sha256.slice(0, 16)}… accepted because simulated TEEs are allowed: this is not a confidential VM`
      ),
      simulated
    };
  }
  if (simulated) {
    const why = listed
      ? 'accepted only when simulated TEEs are allowed'
      : 'and not one of the simulated roots this policy names';
    return {
      check: fail(
        'ark_pinned',
        `ARK ${ark.sha256.slice(0, 16)}… is a SIMULATED root, not AMD's; ${why}`
      ),
      simulated
    };
  }
  return {
    check: fail(
      'ark_pinned',
      `ARK '${ark.commonName}' sha256 ${ark.sha256} is not one of AMD's pinned roots (Milan, Genoa, Turin)`
    ),
    simulated
  };
}

/** ARK pinning, the three RSASSA-PSS signatures and the validity periods of an assembled chain. */
export async function verifyChain(
  chain: CertificateChain,
  options: ChainOptions = {}
): Promise<ChainVerdict> {
  const { check: anchor, simulated } = trustAnchor(chain.ark, options);
  const checks = [
    anchor,
    await verifyIssuedBy('ark_self_signed', chain.ark, chain.ark),
    await verifyIssuedBy('ask_signed_by_ark', chain.ask, chain.ark),
    await verifyIssuedBy('vek_signed_by_ask', chain.vek, chain.ask),
    checkValidity([chain.ark, chain.ask, chain.vek], options.now ?? new Date())
  ];
  return {
    ok: checks.every(check => check.ok),
    simulated,
    product: pinnedProduct(chain.ark.sha256),
    checks
  };
}

/** ECDSA P-384/SHA-384 over report bytes 0x000..0x29F with the VEK's key (r and s stored little-endian). */
export async function verifyReportSignature(
  report: Uint8Array,
  vek: ParsedCertificate
): Promise<Check> {
  const name = 'report_signature';
  if (report.length !== REPORT_SIZE) {
    return fail(
      name,
      `the report is ${report.length} bytes, not ${REPORT_SIZE}`
    );
  }
  const algorithm = new DataView(
    report.buffer,
    report.byteOffset,
    report.byteLength
  ).getUint32(0x034, true);
  if (algorithm !== 1) {
    return fail(
      name,
      `SIGNATURE_ALGO is ${algorithm}; only 1 (ECDSA P-384/SHA-384) exists`
    );
  }
  const padding = signaturePaddingProblems(report);
  if (padding.length) {
    return fail(name, padding.join('; '));
  }
  const signature = new Uint8Array(96);
  signature.set(signatureComponent(report, 0), 0);
  signature.set(signatureComponent(report, 1), 48);
  let verified: boolean;
  try {
    const key = await vekPublicKey(vek);
    verified = await crypto.subtle.verify(
      { name: 'ECDSA', hash: 'SHA-384' },
      key,
      exactBuffer(signature),
      exactBuffer(report.subarray(0, SIGNED_SIZE))
    );
  } catch (error) {
    return fail(
      name,
      `${vek.commonName}'s key is not an ECDSA P-384 key: ${firstLine(error)}`
    );
  }
  if (!verified) {
    return fail(
      name,
      `ECDSA P-384 signature over bytes 0x000-0x29F does not verify with ${vek.commonName}`
    );
  }
  return pass(name, `ECDSA P-384/SHA-384 verified with ${vek.commonName}`);
}

function nonceCheck(claims: Record<string, string>, nonce: string): Check {
  let wanted: Uint8Array;
  try {
    wanted = fromHex(nonce.trim());
  } catch {
    return fail('nonce', 'the nonce this browser chose is not hex');
  }
  if (wanted.length < 1 || wanted.length > MAX_NONCE_BYTES) {
    return fail('nonce', `the nonce must be 1 to ${MAX_NONCE_BYTES} bytes`);
  }
  const given = claims.nonce;
  if (typeof given !== 'string') {
    return fail('nonce', 'the claims carry no nonce');
  }
  let carried: Uint8Array;
  try {
    carried = fromHex(given);
  } catch {
    return fail('nonce', 'the claims carry a nonce that is not hex');
  }
  if (!bytesEqual(carried, wanted)) {
    return fail(
      'nonce',
      'the claims carry a different nonce than this browser asked for (replayed evidence?)'
    );
  }
  return pass('nonce', 'the claims carry the nonce this browser chose');
}

async function reportDataCheck(
  claims: Record<string, string>,
  report: Uint8Array | null
): Promise<Check> {
  if (report === null || report.length !== REPORT_SIZE) {
    return fail('report_data', 'no report to compare REPORT_DATA with');
  }
  let digest: Uint8Array;
  try {
    digest = new Uint8Array(
      await crypto.subtle.digest('SHA-512', exactBuffer(canonicalJson(claims)))
    );
  } catch (error) {
    return fail(
      'report_data',
      `the claims cannot be put in canonical form: ${firstLine(error)}`
    );
  }
  if (!bytesEqual(digest, report.subarray(0x50, 0x90))) {
    return fail(
      'report_data',
      'REPORT_DATA is not SHA-512 of the claims: the claims were not made in this VM'
    );
  }
  return pass('report_data', 'REPORT_DATA = SHA-512 of the canonical claims');
}

function bundleProblem(evidence: EvidenceBundle): string | null {
  if (typeof evidence !== 'object' || evidence === null) {
    return 'the evidence is not an object';
  }
  if (evidence.format !== EVIDENCE_FORMAT) {
    return `evidence format is ${JSON.stringify(evidence.format)}, expected ${EVIDENCE_FORMAT}`;
  }
  if (evidence.tee !== 'sev-snp' && evidence.tee !== 'simulated') {
    return `evidence tee is ${JSON.stringify(evidence.tee)}, expected sev-snp or simulated`;
  }
  if (typeof evidence.claims !== 'object' || evidence.claims === null) {
    return 'the evidence has no claims object';
  }
  const certs = evidence.certs;
  if (
    typeof certs !== 'object' ||
    certs === null ||
    !Array.isArray(certs.chain) ||
    !certs.chain.every(pem => typeof pem === 'string') ||
    (certs.vek !== undefined &&
      certs.vek !== null &&
      typeof certs.vek !== 'string')
  ) {
    return "the evidence's certs are not PEM texts";
  }
  return null;
}

/**
 * Verify a bundle. Never throws: whatever is wrong with the input becomes a failed check that says why, and the
 * verdict is ok only if every check passed.
 */
export async function verifyEvidence(
  evidence: EvidenceBundle,
  options: VerifyOptions
): Promise<BrowserVerdict> {
  const checks: Check[] = [];
  const problem = bundleProblem(evidence);
  if (problem) {
    return {
      ok: false,
      simulated: false,
      checks: [fail('report_format', problem)]
    };
  }
  let report: Uint8Array | null = null;
  let decoded: DecodedReport | undefined;
  try {
    report = fromBase64(evidence.report);
    decoded = decodeReport(report);
    checks.push(
      pass('report_format', `version ${decoded.version}, ${REPORT_SIZE} bytes`)
    );
  } catch (error) {
    checks.push(
      fail('report_format', `the report cannot be read: ${firstLine(error)}`)
    );
  }
  checks.push(nonceCheck(evidence.claims, options.nonce));
  checks.push(await reportDataCheck(evidence.claims, report));

  let chain: CertificateChain | null = null;
  try {
    const vek = evidence.certs.vek
      ? await loadCertificates(evidence.certs.vek, 'VEK certificate')
      : [];
    const pool: ParsedCertificate[] = [];
    for (const pem of evidence.certs.chain) {
      pool.push(...(await loadCertificates(pem, 'certificate chain')));
    }
    chain = assembleChain(vek, pool);
  } catch (error) {
    const why = firstLine(error);
    checks.push(
      ...CHAIN_CHECKS.map(name => fail(name, `no certificate chain: ${why}`))
    );
    checks.push(fail('report_signature', `no VEK certificate: ${why}`));
  }
  let simulated = evidence.tee === 'simulated';
  if (chain) {
    const verdict = await verifyChain(chain, options);
    checks.push(...verdict.checks);
    simulated = simulated || verdict.simulated;
    checks.push(
      report === null
        ? fail('report_signature', 'no report')
        : await verifyReportSignature(report, chain.vek)
    );
    if (report !== null && decoded && verdict.product && !decoded.product) {
      decoded = decodeReport(report, verdict.product); // a v2 report names no product; the pinned root does
    }
  }
  return {
    ok: checks.every(check => check.ok),
    simulated,
    checks,
    report: decoded
  };
}
