/**
 * Just enough DER to cut a certificate into the exact bytes its signature covers.
 *
 * A signature is over the tbsCertificate bytes as the issuer encoded them; a parser that decodes and re-encodes
 * them may normalise something (AMD's VCEKs have serial number 0 and an explicit PSS trailerField) and then a
 * genuine signature fails, or worse, a different encoding passes. So the bytes are sliced, never rebuilt.
 */

export class DerError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DerError';
  }
}

export type Tlv = {
  tag: number;
  /** Offset of the tag byte. */
  start: number;
  /** Offset of the first content byte. */
  contentStart: number;
  /** Offset just past the content. */
  end: number;
};

/** One definite-length TLV with a single-byte tag at `offset`, bounded by `limit`. */
export function readTlv(
  data: Uint8Array,
  offset: number,
  limit: number = data.length
): Tlv {
  if (offset + 2 > limit) {
    throw new DerError(`truncated TLV at offset ${offset}`);
  }
  const tag = data[offset];
  if ((tag & 0x1f) === 0x1f) {
    throw new DerError(`multi-byte tag at offset ${offset}`);
  }
  let length = data[offset + 1];
  let contentStart = offset + 2;
  if (length & 0x80) {
    const octets = length & 0x7f;
    if (octets === 0 || octets > 4) {
      throw new DerError(`unsupported length encoding at offset ${offset}`);
    }
    if (contentStart + octets > limit) {
      throw new DerError(`truncated length at offset ${offset}`);
    }
    length = 0;
    for (let i = 0; i < octets; i++) {
      length = length * 256 + data[contentStart + i];
    }
    if (length < 0x80 || (octets > 1 && data[contentStart] === 0)) {
      throw new DerError(`non-minimal length at offset ${offset}`);
    }
    contentStart += octets;
  }
  const end = contentStart + length;
  if (end > limit) {
    throw new DerError(`TLV at offset ${offset} runs past its container`);
  }
  return { tag, start: offset, contentStart, end };
}

/** The children of a constructed TLV. */
export function children(data: Uint8Array, parent: Tlv): Tlv[] {
  const out: Tlv[] = [];
  let offset = parent.contentStart;
  while (offset < parent.end) {
    const child = readTlv(data, offset, parent.end);
    out.push(child);
    offset = child.end;
  }
  return out;
}

export type CertificateParts = {
  /** The tbsCertificate exactly as encoded (tag and length included): what the issuer signed. */
  tbs: Uint8Array;
  /** The outer signatureAlgorithm AlgorithmIdentifier, encoded. */
  signatureAlgorithm: Uint8Array;
  /** The signature BIT STRING's bits (no unused-bits octet). */
  signature: Uint8Array;
  /** issuer and subject Name, encoded, for matching a child to its issuer byte for byte. */
  issuer: Uint8Array;
  subject: Uint8Array;
};

const SEQUENCE = 0x30;
const BIT_STRING = 0x03;

/** Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue BIT STRING } (RFC 5280). */
export function splitCertificate(der: Uint8Array): CertificateParts {
  const outer = readTlv(der, 0);
  if (outer.tag !== SEQUENCE || outer.end !== der.length) {
    throw new DerError(
      'a certificate is one DER SEQUENCE with nothing after it'
    );
  }
  const parts = children(der, outer);
  if (
    parts.length !== 3 ||
    parts[0].tag !== SEQUENCE ||
    parts[1].tag !== SEQUENCE ||
    parts[2].tag !== BIT_STRING
  ) {
    throw new DerError(
      'a certificate is SEQUENCE { tbsCertificate, signatureAlgorithm, BIT STRING }'
    );
  }
  const [tbs, algorithm, signature] = parts;
  if (
    signature.end - signature.contentStart < 1 ||
    der[signature.contentStart] !== 0
  ) {
    throw new DerError('the signature BIT STRING has unused bits');
  }
  // tbsCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber, signature, issuer, validity, subject, ... }
  const fields = children(der, tbs);
  const first = fields[0]?.tag === 0xa0 ? 1 : 0;
  const issuer = fields[first + 2];
  const subject = fields[first + 4];
  if (
    !issuer ||
    !subject ||
    issuer.tag !== SEQUENCE ||
    subject.tag !== SEQUENCE
  ) {
    throw new DerError('tbsCertificate has no issuer or subject Name');
  }
  return {
    tbs: der.slice(tbs.start, tbs.end),
    signatureAlgorithm: der.slice(algorithm.start, algorithm.end),
    signature: der.slice(signature.contentStart + 1, signature.end),
    issuer: der.slice(issuer.start, issuer.end),
    subject: der.slice(subject.start, subject.end)
  };
}
