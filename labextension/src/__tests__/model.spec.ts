import { agreementCheck, freshNonce } from '../model';
import { IAttestationResponse } from '../tokens';
import { BrowserVerdict } from '../verify';
import { DecodedReport } from '../verify/report';

const MEASUREMENT = 'ab'.repeat(48);
const NONCE = 'cd'.repeat(32);

function server(
  overrides: Partial<IAttestationResponse> = {}
): IAttestationResponse {
  return {
    kernel_id: 'k',
    confidential: true,
    status: 'verified',
    simulated: true,
    nonce: NONCE,
    summary: 'verified',
    checks: [],
    claims: { measurement: MEASUREMENT.toUpperCase() },
    ...overrides
  };
}

function browser(
  ok: boolean,
  measurement = MEASUREMENT,
  simulated = true
): BrowserVerdict {
  return {
    ok,
    simulated,
    checks: [],
    report: { measurement } as DecodedReport
  };
}

describe('agreementCheck', () => {
  it('passes when both verified the same measurement', () => {
    const result = agreementCheck(server(), browser(true), NONCE);
    expect(result).toMatchObject({
      name: 'agreement',
      ok: true,
      outcome: 'pass'
    });
  });

  it('fails when the server says verified and the browser does not', () => {
    const result = agreementCheck(server(), browser(false), NONCE);
    expect(result.ok).toBe(false);
    expect(result.detail).toContain(
      'the server says verified, this browser says failed'
    );
  });

  it('fails when the measurements differ', () => {
    const result = agreementCheck(
      server(),
      browser(true, 'ef'.repeat(48)),
      NONCE
    );
    expect(result.ok).toBe(false);
    expect(result.detail).toContain('measurements differ');
  });

  it('fails when only one side saw a simulated root', () => {
    const result = agreementCheck(
      server({ simulated: false }),
      browser(true),
      NONCE
    );
    expect(result.ok).toBe(false);
    expect(result.detail).toContain('simulated');
  });

  it('fails when the server answered for another nonce', () => {
    const result = agreementCheck(
      server({ nonce: '00'.repeat(32) }),
      browser(true),
      NONCE
    );
    expect(result.ok).toBe(false);
    expect(result.detail).toContain('different nonce');
  });

  it('agrees on a failure both sides saw', () => {
    expect(
      agreementCheck(server({ status: 'failed' }), browser(false), NONCE).ok
    ).toBe(true);
  });
});

describe('freshNonce', () => {
  it('is 32 random bytes in hex, different every time', () => {
    const first = freshNonce();
    expect(first).toMatch(/^[0-9a-f]{64}$/);
    expect(freshNonce()).not.toBe(first);
  });
});
