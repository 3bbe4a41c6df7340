import { ReactWidget, UseSignal } from '@jupyterlab/ui-components';
import * as React from 'react';

import { StatusBadge } from '../components/StatusBadge';
import { ConfnbModel } from '../model';

/** The status-bar item: the current kernel's attestation at a glance. */
export class StatusBadgeWidget extends ReactWidget {
  constructor(
    private readonly _model: ConfnbModel,
    private readonly _open: () => void
  ) {
    super();
    this.addClass('confnb-StatusItem');
  }

  render(): JSX.Element {
    return (
      <UseSignal signal={this._model.changed}>
        {() => (
          <StatusBadge
            state={this._model.current?.badgeState ?? 'pending'}
            idle={this._model.current === null}
            onOpen={this._open}
          />
        )}
      </UseSignal>
    );
  }
}
