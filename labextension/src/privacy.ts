/**
 * The privacy section's data: runtime checks of what the server extension sends about each dataset's privacy
 * mode and budget, and how its numbers are written. A malformed entry is never shown as a budget: it becomes
 * "unknown" (the mode) or "unavailable" (the budget), saying why.
 */

import {
  BudgetState,
  IBudgetReport,
  IDpPrivacy,
  IExactPrivacy,
  PrivacyView
} from './tokens';

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function isAmount(value: unknown): value is number {
  return typeof value === 'number' && Number.isFinite(value) && value >= 0;
}

const AMOUNTS = [
  'epsilon',
  'delta',
  'epsilon_spent',
  'epsilon_remaining',
  'delta_spent',
  'delta_remaining'
] as const;

/** The `privacy` of one policies entry, or null when it is absent or not of the documented shape. */
export function readPrivacy(value: unknown): PrivacyView | null {
  if (!isObject(value)) {
    return null;
  }
  if (value.mode === 'exact') {
    if (
      typeof value.min_group_size !== 'number' ||
      typeof value.difference_checks !== 'boolean'
    ) {
      return null;
    }
    const exact: IExactPrivacy = {
      mode: 'exact',
      min_group_size: value.min_group_size,
      difference_checks: value.difference_checks
    };
    return exact;
  }
  if (value.mode !== 'dp') {
    return null;
  }
  const { epsilon, delta, epsilon_per_kernel, unit, max_contributions } = value;
  if (
    !isAmount(epsilon) ||
    !isAmount(delta) ||
    (epsilon_per_kernel !== undefined && !isAmount(epsilon_per_kernel)) ||
    (unit !== undefined && typeof unit !== 'string') ||
    typeof max_contributions !== 'number'
  ) {
    return null;
  }
  const dp: IDpPrivacy = { mode: 'dp', epsilon, delta, max_contributions };
  if (epsilon_per_kernel !== undefined) {
    dp.epsilon_per_kernel = epsilon_per_kernel;
  }
  if (unit !== undefined) {
    dp.unit = unit;
  }
  if (
    Array.isArray(value.public) &&
    value.public.every(item => typeof item === 'string')
  ) {
    dp.public = value.public as string[];
  }
  return dp;
}

/** One entry of the budgets response for `datasetId`, checked; anything else is an unavailable budget. */
export function readBudget(datasetId: string, value: unknown): BudgetState {
  const refuse = (
    reason: string,
    broker: string | null = null
  ): BudgetState => ({
    dataset_id: datasetId,
    status: 'unavailable',
    broker,
    reason
  });
  if (!isObject(value)) {
    return refuse('the server reported no budget for this dataset');
  }
  const broker = typeof value.broker === 'string' ? value.broker : null;
  if (value.dataset_id !== datasetId) {
    return refuse('the server reported a budget for another dataset', broker);
  }
  if (value.status === 'unavailable') {
    return refuse(
      typeof value.reason === 'string' ? value.reason : 'no reason given',
      broker
    );
  }
  if (
    value.status !== 'ok' ||
    broker === null ||
    !AMOUNTS.every(name => isAmount(value[name])) ||
    !Number.isInteger(value.charges)
  ) {
    return refuse('the server’s budget report is malformed', broker);
  }
  return { ...(value as unknown as IBudgetReport), dataset_id: datasetId };
}

/** The datasets of a policies response that are in DP mode (their budgets are worth asking for). */
export function dpDatasetIds(
  datasets: { id: string; privacy: PrivacyView | null }[]
): string[] {
  return datasets
    .filter(dataset => dataset.privacy?.mode === 'dp')
    .map(dataset => dataset.id);
}

/**
 * ε and δ as an owner writes them: at most six significant digits, no float noise (0.1 + 0.2 is 0.3), and
 * small amounts (δ) in exponent form, 1e-6 rather than 0.000001.
 */
export function formatAmount(value: number): string {
  const rounded = value === 0 ? 0 : Number(value.toPrecision(6));
  return rounded !== 0 && Math.abs(rounded) < 1e-3
    ? rounded.toExponential()
    : String(rounded);
}

/** "exact (minimum group size 10, difference checks on)". */
export function describeExact(privacy: IExactPrivacy): string {
  return (
    `exact (minimum group size ${privacy.min_group_size}, ` +
    `difference checks ${privacy.difference_checks ? 'on' : 'off'})`
  );
}
