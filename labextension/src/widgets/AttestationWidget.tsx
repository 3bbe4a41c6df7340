import { ReactWidget, UseSignal, lockIcon } from '@jupyterlab/ui-components';
import * as React from 'react';

import { AttestationPanel } from '../components/AttestationPanel';
import { ConfnbModel } from '../model';
import { ElementIds } from '../tokens';

/** The right-sidebar widget; it re-renders whenever the current kernel or its attestation changes. */
export class AttestationWidget extends ReactWidget {
  constructor(private readonly _model: ConfnbModel) {
    super();
    this.id = ElementIds.sidebar;
    this.title.icon = lockIcon;
    this.title.caption = 'Attestation';
    this.addClass('confnb-Sidebar');
  }

  render(): JSX.Element {
    return (
      <UseSignal signal={this._model.changed}>
        {() => <AttestationPanel model={this._model} />}
      </UseSignal>
    );
  }
}
