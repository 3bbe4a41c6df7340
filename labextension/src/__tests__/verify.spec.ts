/**
 * @jest-environment node
 */
/// <reference types="node" />
// Node 20's WebCrypto is what the verifier runs on here; the browser's is the same API.

import * as fs from 'fs';
import * as path from 'path';

import { canonicalJson } from '../canonical';
import { fromHex, toBase64 } from '../verify/bytes';
import { readTlv } from '../verify/der';
import {
  AMD_ARK_FINGERPRINTS,
  type CertificateChain,
  type EvidenceBundle,
  assembleChain,
  decodeReport,
  loadCertificates,
  verifyChain,
  verifyEvidence,
  verifyReportSignature
} from '../verify';

// The real AMD vectors live beside the project (../shared), never inside it.
const VECTORS = path.resolve(__dirname, '../../../../shared/vectors/snp');
const HAVE_VECTORS = fs.existsSync(path.join(VECTORS, 'vectors.json'));
// A simulated-TEE evidence bundle written by tests/labextension/test_browser_crypto.py.
const EVIDENCE_DIR = process.env.CONFNB_TEST_EVIDENCE_DIR;

type Vector = {
  id: string;
  report: string;
  vek: string;
  chain: string;
  version: number;
  signing_key: string;
  measurement: string;
  chip_id: string;
  report_data: string;
  vmpl: number;
  reported_tcb: {
    raw: string;
    bl: number;
    tee: number;
    snp: number;
    ucode: number;
    fmc?: number;
  };
  expected: { signature: boolean; chain: boolean; vek_not_after: string };
};

const DAY = 24 * 3600 * 1000;

function readVectors(): Vector[] {
  return JSON.parse(
    fs.readFileSync(path.join(VECTORS, 'vectors.json'), 'utf8')
  ) as Vector[];
}

function file(name: string): Uint8Array {
  return new Uint8Array(fs.readFileSync(path.join(VECTORS, name)));
}

async function chainOf(vector: Vector): Promise<CertificateChain> {
  return assembleChain(
    await loadCertificates(file(vector.vek)),
    await loadCertificates(file(vector.chain))
  );
}

/** A moment inside every certificate's validity (VLEKs expire after a year). */
function insideValidity(vector: Vector): Date {
  return new Date(new Date(vector.expected.vek_not_after).getTime() - 30 * DAY);
}

function flipped(bytes: Uint8Array, offset: number): Uint8Array {
  const copy = Uint8Array.from(bytes);
  copy[offset] ^= 0x01;
  return copy;
}

function failedNames(checks: { name: string; ok: boolean }[]): string[] {
  return checks.filter(check => !check.ok).map(check => check.name);
}

const describeVectors = HAVE_VECTORS ? describe : describe.skip;
if (!HAVE_VECTORS) {
  console.warn(
    `real SEV-SNP vectors not found at ${VECTORS} (../shared beside the project): skipping them`
  );
}

describeVectors('real AMD reports (../shared/vectors/snp)', () => {
  const vectors = HAVE_VECTORS ? readVectors() : [];

  it('covers every vector', () => {
    expect(vectors.length).toBe(19);
  });

  it.each(vectors.map(vector => [vector.id, vector] as const))(
    '%s: signature and chain outcomes are the expected ones',
    async (_id, vector) => {
      const report = file(vector.report);
      const chain = await chainOf(vector);
      expect(chain.vek.role).toBe(vector.signing_key);
      expect(chain.ask.role).toBe(
        vector.signing_key === 'VLEK' ? 'ASVK' : 'ASK'
      );
      const verdict = await verifyChain(chain, { now: insideValidity(vector) });
      expect(verdict.checks.map(check => check.name)).toEqual([
        'ark_pinned',
        'ark_self_signed',
        'ask_signed_by_ark',
        'vek_signed_by_ask',
        'certificate_validity'
      ]);
      expect(failedNames(verdict.checks)).toEqual([]);
      expect(verdict.ok).toBe(vector.expected.chain);
      expect(verdict.simulated).toBe(false);
      const signature = await verifyReportSignature(report, chain.vek);
      expect(signature.ok).toBe(vector.expected.signature);

      const decoded = decodeReport(report, verdict.product);
      expect(decoded.version).toBe(vector.version);
      expect(decoded.measurement).toBe(vector.measurement);
      expect(decoded.chipId).toBe(vector.chip_id);
      expect(decoded.reportData).toBe(vector.report_data);
      expect(decoded.vmpl).toBe(vector.vmpl);
      expect(decoded.signingKey).toBe(vector.signing_key);
      const tcb = vector.reported_tcb;
      expect(decoded.reportedTcb).toEqual({
        raw: tcb.raw,
        bootloader: tcb.bl,
        tee: tcb.tee,
        snp: tcb.snp,
        microcode: tcb.ucode,
        ...(tcb.fmc === undefined ? {} : { fmc: tcb.fmc })
      });
    }
  );

  describe('tampering is caught by the right check', () => {
    const vector = vectors.find(v => v.id === 'R5') ?? vectors[0];

    it('a flipped report byte fails report_signature', async () => {
      const chain = await chainOf(vector);
      const check = await verifyReportSignature(
        flipped(file(vector.report), 0x90),
        chain.vek
      );
      expect(check).toMatchObject({
        name: 'report_signature',
        ok: false,
        outcome: 'fail'
      });
      expect(check.detail).toMatch(/does not verify/);
    });

    it('a flipped signature byte fails report_signature', async () => {
      const chain = await chainOf(vector);
      const check = await verifyReportSignature(
        flipped(file(vector.report), 0x2a0 + 5),
        chain.vek
      );
      expect(check.ok).toBe(false);
      const padding = await verifyReportSignature(
        flipped(file(vector.report), 0x2a0 + 60),
        chain.vek
      );
      expect(padding.ok).toBe(false);
      expect(padding.detail).toMatch(/non-zero bytes above its 48/);
    });

    it("another product's AMD root fails ask_signed_by_ark but is pinned", async () => {
      const other = vectors.find(
        v => v.chain !== vector.chain && !v.chain.includes('vlek')
      )!;
      const foreignArk = (await loadCertificates(file(other.chain))).find(
        cert => cert.role === 'ARK'
      )!;
      const chain = { ...(await chainOf(vector)), ark: foreignArk };
      const verdict = await verifyChain(chain, { now: insideValidity(vector) });
      expect(failedNames(verdict.checks)).toEqual(['ask_signed_by_ark']);
      expect(verdict.ok).toBe(false);
    });

    it('an ARK with one byte changed is neither pinned nor self-signed', async () => {
      const chain = await chainOf(vector);
      const der = flipped(chain.ark.der, chain.ark.der.length - 3); // inside the signature
      const [forged] = await loadCertificates(der);
      const verdict = await verifyChain(
        { ...chain, ark: forged },
        { now: insideValidity(vector) }
      );
      expect(failedNames(verdict.checks)).toEqual([
        'ark_pinned',
        'ark_self_signed'
      ]);
    });

    it("a VCEK of another chip is AMD's but did not sign the report", async () => {
      const chain = await chainOf(vector);
      const sibling = vectors.find(
        v => v.chain === vector.chain && v.chip_id !== vector.chip_id
      )!;
      const stranger = (await chainOf(sibling)).vek;
      const verdict = await verifyChain(
        { ...chain, vek: stranger },
        { now: insideValidity(sibling) }
      );
      expect(failedNames(verdict.checks)).toEqual([]);
      const signature = await verifyReportSignature(
        file(vector.report),
        stranger
      );
      expect(signature.ok).toBe(false);
    });

    it('a VEK with one byte of its body changed fails vek_signed_by_ask', async () => {
      const chain = await chainOf(vector);
      const der = chain.vek.der;
      const tbsEnd = readTlv(der, 0).contentStart + chain.vek.tbs.length;
      const [forged] = await loadCertificates(flipped(der, tbsEnd - 5)); // inside the hwID extension
      expect(forged.commonName).toBe('SEV-VCEK');
      const verdict = await verifyChain(
        { ...chain, vek: forged },
        { now: insideValidity(vector) }
      );
      expect(failedNames(verdict.checks)).toEqual(['vek_signed_by_ask']);
      expect(verdict.checks[3].detail).toMatch(/did not sign SEV-VCEK/);
    });

    it('an expired chain fails certificate_validity', async () => {
      const chain = await chainOf(vector);
      const late = new Date(
        new Date(vector.expected.vek_not_after).getTime() + DAY
      );
      const verdict = await verifyChain(chain, { now: late });
      expect(failedNames(verdict.checks)).toEqual(['certificate_validity']);
      expect(verdict.checks[4].detail).toMatch(/SEV-VCEK is valid/);
    });
  });

  it('pins the three AMD roots the vectors carry', async () => {
    const roots = new Set<string>();
    for (const vector of vectors) {
      roots.add((await chainOf(vector)).ark.sha256);
    }
    expect([...roots].sort()).toEqual(
      Object.values(AMD_ARK_FINGERPRINTS).sort()
    );
  });

  it('verifyEvidence on a real report: chain and signature pass, claims binding fails', async () => {
    const vector = vectors.find(v => v.id === 'R16')!;
    const pem = fs.readFileSync(path.join(VECTORS, vector.vek), 'utf8'); // VCEK, ASK and ARK in one file
    const bundle: EvidenceBundle = {
      format: 'confnb-evidence/1',
      tee: 'sev-snp',
      report: toBase64(file(vector.report)),
      certs: { vek: pem, chain: [] },
      claims: { nonce: 'ab' }
    };
    const verdict = await verifyEvidence(bundle, {
      nonce: 'ab',
      now: insideValidity(vector)
    });
    expect(failedNames(verdict.checks)).toEqual(['report_data']);
    expect(verdict.ok).toBe(false);
    expect(verdict.simulated).toBe(false);
    expect(verdict.report?.product).toBe('Genoa');
  });
});

describe('verifyEvidence input handling', () => {
  it('fails closed, naming the problem, on a malformed bundle', async () => {
    const bundle = {
      format: 'confnb-evidence/1',
      tee: 'sev-snp',
      report: 'not base64!',
      certs: {
        chain: [
          '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n'
        ]
      },
      claims: { nonce: '00' }
    };
    const verdict = await verifyEvidence(bundle, { nonce: '00' });
    expect(verdict.ok).toBe(false);
    expect(verdict.report).toBeUndefined();
    const names = verdict.checks.map(check => check.name);
    for (const name of [
      'report_format',
      'report_data',
      'ark_pinned',
      'report_signature'
    ]) {
      expect(names).toContain(name);
    }
    expect(failedNames(verdict.checks)).not.toContain('nonce');
    for (const check of verdict.checks) {
      expect(check.detail).not.toMatch(/\n/);
    }
  });

  it('rejects another format outright', async () => {
    const verdict = await verifyEvidence(
      {
        format: 'other',
        tee: 'x',
        report: '',
        certs: { chain: [] },
        claims: {}
      },
      {
        nonce: '00'
      }
    );
    expect(verdict.ok).toBe(false);
    expect(verdict.checks).toEqual([
      expect.objectContaining({ name: 'report_format', ok: false })
    ]);
  });
});

const describeEvidence = EVIDENCE_DIR ? describe : describe.skip;

describeEvidence(
  'simulated evidence from the Python simulated TEE (CONFNB_TEST_EVIDENCE_DIR)',
  () => {
    const dir = EVIDENCE_DIR ?? '';
    const read = (name: string): string =>
      fs.readFileSync(path.join(dir, name), 'utf8').trim();
    const evidence = (): EvidenceBundle =>
      JSON.parse(read('evidence.json')) as EvidenceBundle;

    it('verifies with allowSimulated and the simulated root', async () => {
      const verdict = await verifyEvidence(evidence(), {
        nonce: read('nonce.txt'),
        simulatedRoots: [read('simulated_root.txt')],
        allowSimulated: true
      });
      fs.writeFileSync(
        path.join(dir, 'ts_verdict.json'),
        JSON.stringify(verdict, null, 1)
      );
      expect(failedNames(verdict.checks)).toEqual([]);
      expect(verdict.ok).toBe(true);
      expect(verdict.simulated).toBe(true);
      expect(verdict.checks.map(check => check.name)).toEqual([
        'report_format',
        'nonce',
        'report_data',
        'ark_pinned',
        'ark_self_signed',
        'ask_signed_by_ark',
        'vek_signed_by_ask',
        'certificate_validity',
        'report_signature'
      ]);
    });

    it('fails ark_pinned without allowSimulated, and only that', async () => {
      const verdict = await verifyEvidence(evidence(), {
        nonce: read('nonce.txt'),
        simulatedRoots: [read('simulated_root.txt')]
      });
      expect(failedNames(verdict.checks)).toEqual(['ark_pinned']);
      expect(verdict.simulated).toBe(true);
      const unnamed = await verifyEvidence(evidence(), {
        nonce: read('nonce.txt'),
        allowSimulated: true
      });
      expect(failedNames(unnamed.checks)).toEqual(['ark_pinned']);
    });

    it('fails nonce for another nonce, and report_data for changed claims', async () => {
      const options = {
        simulatedRoots: [read('simulated_root.txt')],
        allowSimulated: true
      };
      const replay = await verifyEvidence(evidence(), {
        ...options,
        nonce: 'ff'.repeat(32)
      });
      expect(failedNames(replay.checks)).toEqual(['nonce']);
      const swapped = evidence();
      swapped.claims = {
        ...swapped.claims,
        hpke_public_key: toBase64(fromHex('04' + '11'.repeat(64)))
      };
      const verdict = await verifyEvidence(swapped, {
        ...options,
        nonce: read('nonce.txt')
      });
      expect(failedNames(verdict.checks)).toEqual(['report_data']);
    });

    it('fails report_signature when the host flips a report bit', async () => {
      const bundle = evidence();
      const report = Uint8Array.from(atob(bundle.report), c => c.charCodeAt(0));
      bundle.report = toBase64(flipped(report, 0x30)); // VMPL
      const verdict = await verifyEvidence(bundle, {
        nonce: read('nonce.txt'),
        simulatedRoots: [read('simulated_root.txt')],
        allowSimulated: true
      });
      expect(failedNames(verdict.checks)).toEqual(['report_signature']);
    });

    it('decodes every real vector the way the Python parser does (written for the Python side to compare)', async () => {
      if (!HAVE_VECTORS) {
        return;
      }
      const decoded: Record<string, unknown> = {};
      for (const vector of readVectors()) {
        const chain = await chainOf(vector);
        decoded[vector.id] = decodeReport(
          file(vector.report),
          (await verifyChain(chain)).product
        );
      }
      fs.writeFileSync(
        path.join(dir, 'ts_decoded_vectors.json'),
        JSON.stringify(decoded, null, 1)
      );
      expect(Object.keys(decoded).length).toBe(19);
    });

    it('hashes claims exactly as Python does', () => {
      const claims = evidence().claims;
      expect(Buffer.from(canonicalJson(claims)).toString('utf8')).toBe(
        read('canonical_claims.txt')
      );
    });
  }
);
