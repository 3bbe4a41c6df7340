/**
 * The shapes the browser verifier exchanges with the panel. Declared as type aliases so that they keep the names
 * the panel and the server's JSON use (`Check` is also the server's check shape).
 */

import type { DecodedReport } from './report';

export type Outcome = 'pass' | 'fail' | 'skip';

/** One named check; `detail` says what was found, in one line. */
export type Check = {
  name: string;
  ok: boolean;
  outcome: Outcome;
  detail: string;
};

/** A `confnb-evidence/1` bundle as the kernel sends it (`confnb.attest.evidence.Evidence.to_dict`). */
export type EvidenceBundle = {
  format: string;
  tee: string;
  /** base64 of the 1184-byte report. */
  report: string;
  /** PEM text; `vek` may hold the whole chain, `chain` ASK/ASVK and ARK (one PEM each, or both in one). */
  certs: { vek?: string; chain: string[] };
  claims: Record<string, string>;
};

export type BrowserVerdict = {
  /** True only if every check passed. */
  ok: boolean;
  /** The root is a simulated TEE's, not AMD's: whatever `ok` says, this is not a confidential VM. */
  simulated: boolean;
  checks: Check[];
  /** The report's fields, when the report could be decoded. */
  report?: DecodedReport;
};

export type VerifyOptions = {
  /** The hex nonce the browser chose for this request. */
  nonce: string;
  /** SHA-256 hex of simulated ARK certificates (DER); accepted only with `allowSimulated`. */
  simulatedRoots?: string[];
  allowSimulated?: boolean;
  /** The moment certificates must be valid at (default: now). */
  now?: Date;
};

export function pass(name: string, detail: string): Check {
  return { name, ok: true, outcome: 'pass', detail };
}

export function fail(name: string, detail: string): Check {
  return { name, ok: false, outcome: 'fail', detail };
}

/** The first line of an error's message: rejections are one line, never a stack. */
export function firstLine(error: unknown): string {
  const text = error instanceof Error ? error.message : String(error);
  return text.split('\n', 1)[0];
}
