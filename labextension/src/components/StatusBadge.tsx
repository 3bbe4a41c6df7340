import * as React from 'react';

import { BadgeState } from '../tokens';

export interface IStatusBadgeProps {
  state: BadgeState;
  /** True when no notebook kernel is current. */
  idle: boolean;
  onOpen: () => void;
}

const TEXT: Record<BadgeState, string> = {
  pending: 'SNP: verifying…',
  verified: 'SNP: verified',
  simulated: 'SNP: SIMULATED',
  failed: 'SNP: FAILED',
  'not-confidential': 'not confidential'
};

/** The current kernel's attestation in one word; activating it opens the panel. */
export function StatusBadge({
  state,
  idle,
  onOpen
}: IStatusBadgeProps): JSX.Element {
  const text = idle ? 'SNP: no kernel' : TEXT[state];
  const onKeyDown = (event: React.KeyboardEvent): void => {
    if (event.key === 'Enter' || event.key === ' ') {
      event.preventDefault();
      onOpen();
    }
  };
  return (
    <div
      id="confnb-status-badge"
      className={`confnb-badge confnb-badge-${state}`}
      data-state={state}
      role="button"
      tabIndex={0}
      aria-label={`Kernel attestation: ${text}. Open the attestation panel.`}
      title="Kernel attestation — click to open the panel"
      onClick={onOpen}
      onKeyDown={onKeyDown}
    >
      <span aria-live="polite">{text}</span>
    </div>
  );
}
