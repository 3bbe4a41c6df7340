import * as React from 'react';

import { IAttestationPolicy } from '../tokens';

export interface IAppraisalPolicyProps {
  policy: IAttestationPolicy | null;
}

function describe(value: unknown): string {
  if (Array.isArray(value)) {
    return value.length
      ? value
          .map(item => (typeof item === 'string' ? item : JSON.stringify(item)))
          .join(', ')
      : 'none';
  }
  if (typeof value === 'object' && value !== null) {
    return JSON.stringify(value);
  }
  return String(value);
}

/** The attestation policy the evidence was appraised against: what "verified" means here. */
export function AppraisalPolicy({
  policy
}: IAppraisalPolicyProps): JSX.Element | null {
  if (!policy) {
    return null;
  }
  return (
    <section
      className="confnb-appraisal"
      aria-labelledby="confnb-appraisal-title"
    >
      <h3 id="confnb-appraisal-title">Appraisal policy</h3>
      {policy.allow_simulated ? (
        <p className="confnb-warning">
          This policy accepts simulated TEEs: it is meant for development only.
        </p>
      ) : null}
      <table className="confnb-table">
        <tbody>
          {Object.entries(policy).map(([key, value]) => (
            <tr key={key}>
              <th scope="row">{key}</th>
              <td className="confnb-wrap">{describe(value)}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}
