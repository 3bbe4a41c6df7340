/**
 * confnb's JupyterLab extension: an attestation panel in the right sidebar and a status-bar badge for the
 * current notebook's kernel, verified by the Jupyter server and again in this browser; the encrypted dataset
 * upload; and the kernel's output policies.
 */

import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { INotebookTracker } from '@jupyterlab/notebook';
import { IStatusBar } from '@jupyterlab/statusbar';

// The panel and the badge are built during activation, so lazy imports would gain nothing.
/* eslint-disable jupyter/prefer-lazy-imports */
import { ConfnbModel } from './model';
import { CommandIDs, ElementIds } from './tokens';
import { AttestationWidget } from './widgets/AttestationWidget';
import { StatusBadgeWidget } from './widgets/StatusBadgeWidget';
/* eslint-enable jupyter/prefer-lazy-imports */

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'confnb-lab:plugin',
  description:
    'Attestation panel, status badge and encrypted upload for confidential (confnb) kernels.',
  autoStart: true,
  requires: [INotebookTracker, ILabShell],
  optional: [IStatusBar, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    shell: ILabShell,
    statusBar: IStatusBar | null,
    restorer: ILayoutRestorer | null
  ): void => {
    const model = new ConfnbModel(tracker, app.serviceManager.serverSettings);
    void model.loadPresets();

    const widget = new AttestationWidget(model);
    shell.add(widget, 'right', { rank: 700 });
    restorer?.add(widget, ElementIds.sidebar);

    app.commands.addCommand(CommandIDs.open, {
      label: 'Show Kernel Attestation',
      caption: 'Open the attestation panel of the current notebook’s kernel',
      describedBy: { args: { type: 'object', properties: {} } },
      execute: () => shell.activateById(widget.id)
    });
    app.commands.addCommand(CommandIDs.verify, {
      label: 'Verify Kernel Attestation Again',
      caption: 'Ask the current kernel for fresh evidence and verify it again',
      describedBy: { args: { type: 'object', properties: {} } },
      isEnabled: () => model.current !== null,
      execute: async () => {
        shell.activateById(widget.id);
        await model.verifyCurrent();
      }
    });

    if (statusBar) {
      const badge = new StatusBadgeWidget(
        model,
        () => void app.commands.execute(CommandIDs.open)
      );
      statusBar.registerStatusItem('confnb-lab:status', {
        item: badge,
        align: 'left',
        rank: 4
      });
    }
  }
};

export default plugin;
