import * as React from 'react';

import { ICheck } from '../tokens';

export interface IChecksListProps {
  checks: ICheck[];
}

const MARKS: Record<ICheck['outcome'], string> = {
  pass: '✓',
  fail: '✗',
  skip: '–'
};

function CheckItem({ item }: { item: ICheck }): JSX.Element {
  return (
    <li
      className="confnb-check"
      data-check={item.name}
      data-ok={String(item.ok)}
      data-outcome={item.outcome}
    >
      <span className="confnb-check-mark" aria-hidden="true">
        {MARKS[item.outcome]}
      </span>
      <span className="confnb-check-name">
        {item.name}
        <span className="confnb-visually-hidden">
          {item.ok
            ? ' passed'
            : item.outcome === 'skip'
              ? ' skipped'
              : ' failed'}
        </span>
      </span>
      <span className="confnb-check-detail">{item.detail}</span>
    </li>
  );
}

function Group({
  title,
  checks
}: {
  title: string;
  checks: ICheck[];
}): JSX.Element | null {
  if (checks.length === 0) {
    return null;
  }
  const failed = checks.filter(item => !item.ok).length;
  return (
    <section className="confnb-check-group" aria-label={title}>
      <h4>
        {title}{' '}
        <span className="confnb-check-count">
          {failed
            ? `${failed} of ${checks.length} failed`
            : `all ${checks.length} passed`}
        </span>
      </h4>
      <ul className="confnb-checks">
        {checks.map(item => (
          <CheckItem key={item.name} item={item} />
        ))}
      </ul>
    </section>
  );
}

/**
 * The server's checks, the browser's own checks of the same evidence, and whether the two agree: shown apart so
 * that a green server list cannot hide a red browser one.
 */
export function ChecksList({ checks }: IChecksListProps): JSX.Element | null {
  if (checks.length === 0) {
    return null;
  }
  const browser = checks.filter(item => item.name.startsWith('browser.'));
  const agreement = checks.filter(item => item.name === 'agreement');
  const server = checks.filter(
    item => !browser.includes(item) && !agreement.includes(item)
  );
  return (
    <div className="confnb-checks-list">
      <Group title="Jupyter server" checks={server} />
      <Group title="This browser" checks={browser} />
      <Group title="Agreement" checks={agreement} />
    </div>
  );
}
