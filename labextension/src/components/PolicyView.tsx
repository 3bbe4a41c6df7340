import { refreshIcon } from '@jupyterlab/ui-components';
import * as React from 'react';

import { BudgetState, IPoliciesResponse } from '../tokens';
import { PrivacySection } from './PrivacySection';

export interface IPolicyViewProps {
  policies: IPoliciesResponse | null;
  error: string | null;
  /** DP datasets' budgets by dataset id; the policies render without waiting for them. */
  budgets: ReadonlyMap<string, BudgetState>;
  /** Null when there is no kernel to ask. */
  onRefresh: (() => void) | null;
}

function entries(
  record: Record<string, unknown> | undefined
): [string, string][] {
  return Object.entries(record ?? {}).map(([key, value]) => [
    key,
    typeof value === 'string' ? value : JSON.stringify(value)
  ]);
}

/** What may leave the kernel: each dataset's output policy in plain language, and the display policy. */
export function PolicyView({
  policies,
  error,
  budgets,
  onRefresh
}: IPolicyViewProps): JSX.Element {
  const display = entries(policies?.display);
  const withheld = entries(policies?.withheld);
  return (
    <section
      id="confnb-policy-view"
      className="confnb-policy-view"
      aria-labelledby="confnb-policy-title"
    >
      <div className="confnb-section-header">
        <h3 id="confnb-policy-title">Output policies</h3>
        <button
          type="button"
          id="confnb-policy-refresh"
          className="jp-Button jp-mod-minimal confnb-icon-button"
          onClick={onRefresh ?? undefined}
          disabled={onRefresh === null}
          aria-label="Refresh output policies"
          title="Refresh output policies"
        >
          <refreshIcon.react tag="span" />
          Refresh
        </button>
      </div>
      {error ? <p className="confnb-error">{error}</p> : null}
      {policies && policies.datasets.length === 0 ? (
        <p>No dataset is open in this kernel.</p>
      ) : null}
      {(policies?.datasets ?? []).map(dataset => (
        <section
          key={dataset.id}
          className="confnb-policy"
          data-dataset={dataset.id}
        >
          <h4>
            {dataset.id}{' '}
            <span className="confnb-muted">({dataset.source})</span>
          </h4>
          <ul>
            {dataset.explanation.map((line, index) => (
              <li key={index}>{line}</li>
            ))}
          </ul>
          <PrivacySection
            privacy={dataset.privacy}
            budget={
              dataset.privacy?.mode === 'dp'
                ? (budgets.get(dataset.id) ?? null)
                : null
            }
          />
          {dataset.policy_id ? (
            <p className="confnb-muted">
              Policy <code title={dataset.policy_id}>{dataset.policy_id}</code>
            </p>
          ) : null}
        </section>
      ))}
      {display.length ? (
        <section className="confnb-display-policy" aria-label="Display policy">
          <h4>Display policy</h4>
          <table className="confnb-table">
            <tbody>
              {display.map(([key, value]) => (
                <tr key={key}>
                  <th scope="row">{key}</th>
                  <td className="confnb-wrap">{value}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </section>
      ) : null}
      {withheld.length ? (
        <section className="confnb-withheld" aria-label="Withheld outputs">
          <h4>Withheld so far</h4>
          <table className="confnb-table">
            <tbody>
              {withheld.map(([key, value]) => (
                <tr key={key}>
                  <th scope="row">{key}</th>
                  <td className="confnb-wrap">{value}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </section>
      ) : null}
    </section>
  );
}
