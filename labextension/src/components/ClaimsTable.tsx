import * as React from 'react';

import { IEvidenceBundle, IReportClaims, ITcb } from '../tokens';

export interface IClaimsTableProps {
  claims: IReportClaims | null;
  evidence: IEvidenceBundle | null;
}

export function formatTcb(tcb: ITcb | undefined): string {
  if (!tcb) {
    return '—';
  }
  const parts = [
    `BL ${tcb.bootloader}`,
    `TEE ${tcb.tee}`,
    `SNP ${tcb.snp}`,
    `µcode ${tcb.microcode}`
  ];
  if (tcb.fmc !== undefined && tcb.fmc !== null) {
    parts.unshift(`FMC ${tcb.fmc}`);
  }
  return parts.join(' · ');
}

function Hex({ value }: { value: string | undefined }): JSX.Element {
  if (!value) {
    return <>—</>;
  }
  return (
    <code className="confnb-hex" title={value}>
      {value}
    </code>
  );
}

/** What the report says about the VM: measurement, firmware versions, guest policy, who signed it. */
export function ClaimsTable({
  claims,
  evidence
}: IClaimsTableProps): JSX.Element | null {
  if (!claims) {
    return null;
  }
  const bits = claims.policy_bits ?? {};
  const rows: [string, React.ReactNode][] = [
    ['TEE', claims.tee ?? evidence?.tee ?? '—'],
    ['Product', claims.product ?? '—'],
    ['Measurement', <Hex value={claims.measurement} />],
    ['Signing key', claims.signing_key ?? '—'],
    ['Report version', claims.report_version ?? '—'],
    ['VMPL', claims.vmpl ?? '—'],
    ['Report time', claims.report_time ?? '—'],
    ['Current TCB', formatTcb(claims.tcb_current)],
    ['Reported TCB', formatTcb(claims.tcb_reported)],
    ['Committed TCB', formatTcb(claims.tcb_committed)],
    [
      'Guest policy',
      Object.keys(bits).length
        ? Object.entries(bits)
            .map(([name, on]) => `${name} ${on ? 'on' : 'off'}`)
            .join(', ')
        : '—'
    ],
    ['Chip ID', <Hex value={claims.chip_id} />],
    ['Kernel HPKE key', <Hex value={evidence?.claims.hpke_public_key} />]
  ];
  return (
    <section className="confnb-claims" aria-labelledby="confnb-claims-title">
      <h3 id="confnb-claims-title">Report</h3>
      <table className="confnb-table">
        <tbody>
          {rows.map(([label, value]) => (
            <tr key={label}>
              <th scope="row">{label}</th>
              <td>{value}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}
