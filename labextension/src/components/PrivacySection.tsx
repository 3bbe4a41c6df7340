import * as React from 'react';

import { describeExact, formatAmount } from '../privacy';
import { BudgetState, IDpPrivacy, PrivacyView } from '../tokens';

export interface IPrivacySectionProps {
  privacy: PrivacyView | null;
  /** Null for a dataset that is not in DP mode. */
  budget: BudgetState | null;
}

/** Spent and remaining, as the owner's broker reports them; or why the panel cannot say. */
function Budget({ budget }: { budget: BudgetState | null }): JSX.Element {
  if (budget === null || budget.status === 'loading') {
    return (
      <td className="confnb-budget confnb-muted" data-state="loading">
        asking the owner’s broker…
      </td>
    );
  }
  if (budget.status === 'unavailable') {
    return (
      <td className="confnb-budget confnb-wrap" data-state="unavailable">
        <span className="confnb-warning">Budget unavailable: </span>
        {budget.reason}
      </td>
    );
  }
  return (
    <td
      className="confnb-budget confnb-wrap"
      data-state="ok"
      data-epsilon-spent={budget.epsilon_spent}
      data-epsilon-remaining={budget.epsilon_remaining}
    >
      <progress
        className="confnb-budget-bar"
        max={budget.epsilon}
        value={Math.min(budget.epsilon_spent, budget.epsilon)}
        aria-label="Share of the privacy budget spent"
      />
      <div>
        ε {formatAmount(budget.epsilon_spent)} spent,{' '}
        <strong>{formatAmount(budget.epsilon_remaining)} remaining</strong> of{' '}
        {formatAmount(budget.epsilon)}
      </div>
      <div>
        δ {formatAmount(budget.delta_spent)} spent,{' '}
        {formatAmount(budget.delta_remaining)} remaining
      </div>
      <div className="confnb-muted">
        {budget.charges} {budget.charges === 1 ? 'release' : 'releases'} paid,
        as <code>{budget.broker}</code> reports
      </div>
    </td>
  );
}

function DpRows({
  privacy,
  budget
}: {
  privacy: IDpPrivacy;
  budget: BudgetState | null;
}): JSX.Element {
  const rows = privacy.max_contributions === 1 ? 'row' : 'rows';
  return (
    <tbody>
      <tr>
        <th scope="row">Mode</th>
        <td>differential privacy: every released number is noisy</td>
      </tr>
      <tr>
        <th scope="row">Total budget</th>
        <td className="confnb-privacy-total">
          ε = {formatAmount(privacy.epsilon)} (δ = {formatAmount(privacy.delta)}
          )
        </td>
      </tr>
      <tr>
        <th scope="row">Per kernel</th>
        <td className="confnb-privacy-cap">
          {privacy.epsilon_per_kernel !== undefined
            ? `at most ε = ${formatAmount(privacy.epsilon_per_kernel)}`
            : 'no cap: one kernel may spend the whole budget'}
        </td>
      </tr>
      <tr>
        <th scope="row">Unit</th>
        <td className="confnb-privacy-unit">
          {privacy.unit !== undefined ? (
            <>
              one person is <code>{privacy.unit}</code>, up to{' '}
              {privacy.max_contributions} {rows} each
            </>
          ) : (
            `one row is one person (up to ${privacy.max_contributions} ${rows} each)`
          )}
        </td>
      </tr>
      <tr>
        <th scope="row">Budget</th>
        <Budget budget={budget} />
      </tr>
    </tbody>
  );
}

/** A dataset's privacy mode, and under differential privacy its budget: what the owner allows, what is left. */
export function PrivacySection({
  privacy,
  budget
}: IPrivacySectionProps): JSX.Element {
  return (
    <section
      className="confnb-privacy"
      data-mode={privacy?.mode ?? 'unknown'}
      aria-label="Privacy"
    >
      <h5>Privacy</h5>
      {privacy === null ? (
        <p className="confnb-warning">
          unknown: the server could not read this dataset’s privacy table
        </p>
      ) : privacy.mode === 'exact' ? (
        <p className="confnb-privacy-exact">{describeExact(privacy)}</p>
      ) : (
        <table className="confnb-table">
          <DpRows privacy={privacy} budget={budget} />
        </table>
      )}
    </section>
  );
}
