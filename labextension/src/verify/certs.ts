/**
 * AMD's certificate chain, ARK (self-signed root) -> ASK (or ASVK, for VLEKs) -> VEK, checked with WebCrypto.
 *
 * Certificates are parsed with @peculiar/asn1-x509 for their names, dates and keys, but every signature is
 * checked over the tbsCertificate bytes sliced from the original DER (see `der.ts`). RSA keys are imported as JWK
 * (modulus and exponent) so that a key whose SubjectPublicKeyInfo names RSASSA-PSS imports in every browser.
 */

import { AsnConvert } from '@peculiar/asn1-schema';
import { AlgorithmIdentifier, Certificate } from '@peculiar/asn1-x509';
import {
  RSAPublicKey,
  RsaSaPssParams,
  id_RSASSA_PSS,
  id_mgf1,
  id_sha384
} from '@peculiar/asn1-rsa';

import { bytesEqual, exactBuffer, fromBase64, sha256Hex } from './bytes';
import { splitCertificate } from './der';
import type { Product } from './report';
import { type Check, fail, firstLine, pass } from './types';

const OID_COMMON_NAME = '2.5.4.3';
const OID_ORGANIZATION = '2.5.4.10';
const OID_RSA_ENCRYPTION = '1.2.840.113549.1.1.1';
const OID_EC_PUBLIC_KEY = '1.2.840.10045.2.1';
const PSS_SALT_LENGTH = 48;

/** The organisation in every name of the simulated TEE's certificates (`confnb.attest.certs`). */
export const SIMULATED_ORGANIZATION = 'confnb SIMULATED TEE - not AMD';

export type CertRole = 'ARK' | 'ASK' | 'ASVK' | 'VCEK' | 'VLEK';

export type ParsedCertificate = {
  der: Uint8Array;
  /** SHA-256 of the DER, lower-case hex: what roots are pinned by. */
  sha256: string;
  commonName: string;
  organization: string;
  /** Read from the subject common name (ARK-Genoa, SEV-Genoa, SEV-VLEK-Genoa, SEV-VCEK, SEV-VLEK). */
  role: CertRole | null;
  /** From the CA's common name; null for a VEK. */
  product: Product | null;
  notBefore: Date;
  notAfter: Date;
  /** Encoded issuer and subject Names: a child is matched to its issuer byte for byte. */
  issuerName: Uint8Array;
  subjectName: Uint8Array;
  /** What the signature covers, and the signature, exactly as encoded. */
  tbs: Uint8Array;
  signature: Uint8Array;
  signatureAlgorithm: Uint8Array;
  /** The parsed certificate, for what the checks read (key, algorithm parameters). */
  asn: Certificate;
};

export type CertificateChain = {
  vek: ParsedCertificate;
  ask: ParsedCertificate;
  ark: ParsedCertificate;
};

/** Input that holds no certificate, or a certificate that does not parse. */
export class CertificateError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CertificateError';
  }
}

function products(name: string): Product | null {
  const base = name.split('-', 1)[0].toLowerCase();
  return base === 'milan'
    ? 'Milan'
    : base === 'genoa'
      ? 'Genoa'
      : base === 'turin'
        ? 'Turin'
        : null;
}

function roleAndProduct(commonName: string): [CertRole | null, Product | null] {
  if (commonName === 'SEV-VCEK') {
    return ['VCEK', null];
  }
  if (commonName === 'SEV-VLEK') {
    return ['VLEK', null];
  }
  if (commonName.startsWith('ARK-')) {
    return ['ARK', products(commonName.slice(4))];
  }
  if (commonName.startsWith('SEV-VLEK-')) {
    return ['ASVK', products(commonName.slice(9))];
  }
  if (commonName.startsWith('SEV-')) {
    return ['ASK', products(commonName.slice(4))];
  }
  return [null, null];
}

function nameAttribute(cert: Certificate, oid: string): string {
  const values = cert.tbsCertificate.subject
    .flatMap(rdn => Array.from(rdn))
    .filter(attribute => attribute.type === oid)
    .map(attribute => attribute.value.toString());
  return values.length === 1 ? values[0] : '';
}

/** Parse one DER certificate. */
export async function parseCertificate(
  der: Uint8Array
): Promise<ParsedCertificate> {
  let asn: Certificate;
  let parts: ReturnType<typeof splitCertificate>;
  try {
    parts = splitCertificate(der);
    asn = AsnConvert.parse(exactBuffer(der), Certificate);
  } catch (error) {
    throw new CertificateError(
      `not a valid X.509 certificate: ${firstLine(error)}`
    );
  }
  const commonName = nameAttribute(asn, OID_COMMON_NAME);
  const [role, product] = roleAndProduct(commonName);
  const validity = asn.tbsCertificate.validity;
  return {
    der: Uint8Array.from(der),
    sha256: await sha256Hex(der),
    commonName: commonName || '(no common name)',
    organization: nameAttribute(asn, OID_ORGANIZATION),
    role,
    product,
    notBefore: validity.notBefore.getTime(),
    notAfter: validity.notAfter.getTime(),
    issuerName: parts.issuer,
    subjectName: parts.subject,
    tbs: parts.tbs,
    signature: parts.signature,
    signatureAlgorithm: parts.signatureAlgorithm,
    asn
  };
}

const PEM_BLOCK =
  /-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]*?)-----END CERTIFICATE-----/g;

/** Every certificate in PEM text (one or more blocks), or one DER certificate given as bytes. */
export async function loadCertificates(
  data: string | Uint8Array,
  what = 'certificate'
): Promise<ParsedCertificate[]> {
  let ders: Uint8Array[];
  const text = typeof data === 'string' ? data : null;
  if (text !== null || (data.length > 0 && data[0] !== 0x30)) {
    const pem = text ?? new TextDecoder().decode(data as Uint8Array);
    if (!pem.includes('-----BEGIN')) {
      throw new CertificateError(`${what}: neither PEM nor DER`);
    }
    ders = [];
    for (const match of pem.matchAll(PEM_BLOCK)) {
      try {
        ders.push(fromBase64(match[1].replace(/\s+/g, '')));
      } catch {
        throw new CertificateError(`${what}: bad PEM (base64)`);
      }
    }
    if (ders.length === 0) {
      throw new CertificateError(
        `${what}: no CERTIFICATE block in the PEM text`
      );
    }
  } else {
    if (data.length === 0) {
      throw new CertificateError(`${what}: empty input`);
    }
    ders = [data as Uint8Array];
  }
  const out: ParsedCertificate[] = [];
  for (const der of ders) {
    try {
      out.push(await parseCertificate(der));
    } catch (error) {
      throw new CertificateError(`${what}: ${firstLine(error)}`);
    }
  }
  return out;
}

function selfIssued(cert: ParsedCertificate): boolean {
  return bytesEqual(cert.issuerName, cert.subjectName);
}

/**
 * Sort the supplied certificates into VEK, ASK/ASVK and ARK. The VEK is the VCEK/VLEK among `vekCerts` (a VEK
 * file may carry the whole chain); issuers are found by name, and, failing that, by role, so that a forged or
 * mismatched certificate still lands in its place and the signature checks say what is wrong with it.
 */
export function assembleChain(
  vekCerts: ParsedCertificate[],
  chainCerts: ParsedCertificate[]
): CertificateChain {
  const isLeaf = (cert: ParsedCertificate): boolean =>
    cert.role === 'VCEK' || cert.role === 'VLEK';
  let vek = vekCerts.find(isLeaf) ?? vekCerts[0];
  const pool = [...vekCerts.filter(cert => cert !== vek), ...chainCerts];
  vek = vek ?? pool.find(isLeaf);
  if (!vek) {
    throw new CertificateError('no VCEK or VLEK certificate in the evidence');
  }
  const leaf = vek;
  const issuerRoles: CertRole[] = leaf.role === 'VLEK' ? ['ASVK'] : ['ASK'];
  const cas = pool.filter(cert => cert !== leaf);
  const ask =
    cas.find(
      cert => !selfIssued(cert) && bytesEqual(cert.subjectName, leaf.issuerName)
    ) ??
    cas.find(cert => cert.role !== null && issuerRoles.includes(cert.role));
  if (!ask) {
    throw new CertificateError(
      `no ${issuerRoles[0]} certificate (the issuer of ${leaf.commonName}) in the evidence`
    );
  }
  const roots = cas.filter(cert => cert !== ask && selfIssued(cert));
  const ark =
    roots.find(cert => bytesEqual(cert.subjectName, ask.issuerName)) ??
    roots.find(cert => cert.role === 'ARK');
  if (!ark) {
    throw new CertificateError(
      `no self-signed ARK certificate (the issuer of ${ask.commonName}) in the evidence`
    );
  }
  return { vek: leaf, ask, ark };
}

function base64Url(bytes: Uint8Array): string {
  let start = 0;
  while (start < bytes.length - 1 && bytes[start] === 0) {
    start++; // JWK wants the unsigned big-endian value; DER INTEGERs may carry a leading zero
  }
  let binary = '';
  for (const byte of bytes.subarray(start)) {
    binary += String.fromCharCode(byte);
  }
  return btoa(binary)
    .replace(/\+/g, '-')
    .replace(/\//g, '_')
    .replace(/=+$/, '');
}

/** Why a signature algorithm is not RSASSA-PSS with SHA-384, MGF1-SHA-384, salt 48 (null if it is). */
function pssProblem(cert: ParsedCertificate): string | null {
  const algorithm = cert.asn.signatureAlgorithm;
  if (
    !bytesEqual(
      cert.signatureAlgorithm,
      new Uint8Array(AsnConvert.serialize(cert.asn.tbsCertificate.signature))
    )
  ) {
    return 'the signature algorithm inside the certificate differs from the one outside it';
  }
  if (algorithm.algorithm !== id_RSASSA_PSS || !algorithm.parameters) {
    return `signed with ${algorithm.algorithm}, not RSASSA-PSS`;
  }
  const params = AsnConvert.parse(algorithm.parameters, RsaSaPssParams);
  const mgf = params.maskGenAlgorithm;
  const mgfHash = mgf.parameters
    ? AsnConvert.parse(mgf.parameters, AlgorithmIdentifier).algorithm
    : '';
  if (
    params.hashAlgorithm.algorithm !== id_sha384 ||
    mgf.algorithm !== id_mgf1 ||
    mgfHash !== id_sha384 ||
    params.saltLength !== PSS_SALT_LENGTH ||
    params.trailerField !== 1
  ) {
    return 'RSASSA-PSS parameters are not SHA-384, MGF1-SHA-384, salt length 48';
  }
  return null;
}

async function rsaPssKey(cert: ParsedCertificate): Promise<CryptoKey> {
  const spki = cert.asn.tbsCertificate.subjectPublicKeyInfo;
  if (
    spki.algorithm.algorithm !== OID_RSA_ENCRYPTION &&
    spki.algorithm.algorithm !== id_RSASSA_PSS
  ) {
    throw new CertificateError(`${cert.commonName}'s key is not an RSA key`);
  }
  const key = AsnConvert.parse(spki.subjectPublicKey, RSAPublicKey);
  const jwk: JsonWebKey = {
    kty: 'RSA',
    n: base64Url(new Uint8Array(key.modulus)),
    e: base64Url(new Uint8Array(key.publicExponent)),
    ext: true
  };
  return crypto.subtle.importKey(
    'jwk',
    jwk,
    { name: 'RSA-PSS', hash: 'SHA-384' },
    false,
    ['verify']
  );
}

/** The check that `issuer`'s key signed `subject` with RSASSA-PSS/SHA-384 (salt 48), as AMD's CAs sign. */
export async function verifyIssuedBy(
  name: string,
  subject: ParsedCertificate,
  issuer: ParsedCertificate
): Promise<Check> {
  if (!bytesEqual(subject.issuerName, issuer.subjectName)) {
    return fail(
      name,
      `${subject.commonName} names a different issuer than ${issuer.commonName}`
    );
  }
  let problem: string | null;
  try {
    problem = pssProblem(subject);
  } catch (error) {
    problem = `unreadable signature algorithm: ${firstLine(error)}`;
  }
  if (problem) {
    return fail(name, `${subject.commonName}: ${problem}`);
  }
  let verified: boolean;
  try {
    const key = await rsaPssKey(issuer);
    verified = await crypto.subtle.verify(
      { name: 'RSA-PSS', saltLength: PSS_SALT_LENGTH },
      key,
      exactBuffer(subject.signature),
      exactBuffer(subject.tbs)
    );
  } catch (error) {
    return fail(
      name,
      `${issuer.commonName}'s key cannot check ${subject.commonName}: ${firstLine(error)}`
    );
  }
  if (!verified) {
    return fail(
      name,
      `${issuer.commonName}'s key did not sign ${subject.commonName}`
    );
  }
  return pass(
    name,
    `${subject.commonName} signed by ${issuer.commonName} (RSASSA-PSS)`
  );
}

/** The VEK's P-384 public key, for the report signature. */
export async function vekPublicKey(vek: ParsedCertificate): Promise<CryptoKey> {
  const spki = vek.asn.tbsCertificate.subjectPublicKeyInfo;
  if (spki.algorithm.algorithm !== OID_EC_PUBLIC_KEY) {
    throw new CertificateError(
      `${vek.commonName}'s key is not an elliptic-curve key`
    );
  }
  return crypto.subtle.importKey(
    'spki',
    exactBuffer(new Uint8Array(AsnConvert.serialize(spki))),
    { name: 'ECDSA', namedCurve: 'P-384' },
    false,
    ['verify']
  );
}

function day(moment: Date): string {
  return moment.toISOString().slice(0, 10);
}

/** `now` must lie within every certificate's validity period. */
export function checkValidity(certs: ParsedCertificate[], now: Date): Check {
  const problems = certs
    .filter(
      cert =>
        !(
          cert.notBefore.getTime() <= now.getTime() &&
          now.getTime() <= cert.notAfter.getTime()
        )
    )
    .map(
      cert =>
        `${cert.commonName} is valid ${day(cert.notBefore)} to ${day(cert.notAfter)}, not at ${now.toISOString()}`
    );
  if (problems.length) {
    return fail('certificate_validity', problems.join('; '));
  }
  const from = new Date(
    Math.max(...certs.map(cert => cert.notBefore.getTime()))
  );
  const until = new Date(
    Math.min(...certs.map(cert => cert.notAfter.getTime()))
  );
  return pass(
    'certificate_validity',
    `every certificate valid at ${now.toISOString()} (chain valid ${day(from)} to ${day(until)})`
  );
}
