import { Clipboard } from '@jupyterlab/apputils';
import { copyIcon, refreshIcon } from '@jupyterlab/ui-components';
import * as React from 'react';

import { ConfnbModel } from '../model';
import { BudgetState, IUploadStatus } from '../tokens';
import { AppraisalPolicy } from './AppraisalPolicy';
import { ChecksList } from './ChecksList';
import { ClaimsTable } from './ClaimsTable';
import { PolicyView } from './PolicyView';
import { UploadForm } from './UploadForm';

export interface IAttestationPanelProps {
  model: ConfnbModel;
}

const NO_UPLOAD: IUploadStatus = {
  state: 'idle',
  message: '',
  received: 0,
  total: 0
};

const NO_BUDGETS: ReadonlyMap<string, BudgetState> = new Map();

const HEADLINE = {
  pending: 'Verifying…',
  verified: 'Verified',
  failed: 'Not verified'
} as const;

async function copyText(text: string): Promise<void> {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    Clipboard.copyToSystem(text); // no clipboard permission: the legacy copy path still works on a click
  }
}

/**
 * The current notebook kernel's attestation: the verdict, every check (server, browser, agreement), the report,
 * the appraisal policy, the evidence itself, the output policies and the encrypted upload.
 */
export function AttestationPanel({
  model
}: IAttestationPanelProps): JSX.Element {
  const attestation = model.current;
  const state = attestation?.state ?? null;
  const status = state?.status ?? 'pending';
  const simulated = state?.simulated ?? false;
  // Open by default: the evidence is what the verdict rests on, and it stays in a scrolling box.
  const [evidenceOpen, setEvidenceOpen] = React.useState(true);
  const [copied, setCopied] = React.useState('');
  const evidenceJson = state?.evidence
    ? JSON.stringify(state.evidence, null, 2)
    : '';

  const copyEvidence = (): void => {
    setEvidenceOpen(true);
    copyText(evidenceJson).then(
      () => setCopied('Evidence copied to the clipboard.'),
      () =>
        setCopied(
          'The clipboard refused the evidence; select it below instead.'
        )
    );
  };

  let summary: string;
  if (!attestation) {
    summary = model.hasNotebook
      ? 'Waiting for the notebook’s kernel…'
      : 'Open a notebook to verify its kernel.';
  } else if (state && !state.confidential) {
    summary =
      'This kernel is not a confidential kernel: nothing about it is attested.';
  } else {
    summary = state?.summary ?? '';
  }

  return (
    <div
      id="confnb-attestation-panel"
      className={`confnb-Panel confnb-status-${status}`}
      data-status={status}
      data-simulated={String(simulated)}
      data-kernel-id={state?.kernelId ?? ''}
      data-verify-ms={
        state?.verifyMs !== null && state?.verifyMs !== undefined
          ? state.verifyMs.toFixed(1)
          : ''
      }
      data-nonce={state?.nonce ?? ''}
    >
      <header className="confnb-header">
        <h2>Attestation</h2>
        <p className="confnb-verdict" role="status" aria-live="polite">
          <strong className={`confnb-verdict-${status}`}>
            {HEADLINE[status]}
          </strong>
          {simulated && status === 'verified' ? ' (simulated)' : ''}
          {state?.verifyMs !== null && state?.verifyMs !== undefined ? (
            <span className="confnb-muted">
              {' '}
              in {Math.round(state.verifyMs)} ms
            </span>
          ) : null}
        </p>
      </header>
      {simulated ? (
        <div className="confnb-simulated-banner" role="alert">
          SIMULATED TEE — this kernel does not run in a confidential VM. Its
          evidence is signed by a locally generated key, not by AMD: nothing
          here protects data from the host.
        </div>
      ) : null}
      <p className="confnb-summary">{summary}</p>
      {state?.kernelId ? (
        <p className="confnb-muted">
          Kernel <code>{state.kernelId}</code>
          {state.verifiedAt ? <> · evidence of {state.verifiedAt}</> : null}
        </p>
      ) : null}
      <div className="confnb-buttons">
        <button
          type="button"
          id="confnb-verify-again"
          className="jp-Button jp-mod-styled"
          disabled={
            !attestation || (state?.status === 'pending' && state.nonce !== '')
          }
          onClick={() => void model.verifyCurrent()}
        >
          <refreshIcon.react tag="span" />
          Verify again
        </button>
        <button
          type="button"
          id="confnb-copy-evidence"
          className="jp-Button jp-mod-styled"
          disabled={!evidenceJson}
          onClick={copyEvidence}
        >
          <copyIcon.react tag="span" />
          Copy evidence
        </button>
      </div>
      <p className="confnb-muted" aria-live="polite">
        {copied}
      </p>
      <ChecksList checks={state?.checks ?? []} />
      <ClaimsTable
        claims={state?.claims ?? null}
        evidence={state?.evidence ?? null}
      />
      <AppraisalPolicy policy={state?.policy ?? null} />
      <details
        className="confnb-evidence"
        open={evidenceOpen}
        onToggle={event =>
          setEvidenceOpen((event.currentTarget as HTMLDetailsElement).open)
        }
      >
        <summary>Evidence</summary>
        <pre id="confnb-evidence-json">{evidenceJson}</pre>
      </details>
      <PolicyView
        policies={attestation?.policies ?? null}
        error={attestation?.policiesError ?? null}
        budgets={attestation?.budgets ?? NO_BUDGETS}
        onRefresh={
          attestation ? () => void attestation.refreshPolicies() : null
        }
      />
      <UploadForm
        key={state?.kernelId ?? 'none'}
        enabled={status === 'verified' && attestation?.verifiedHpkeKey !== null}
        presets={model.presets}
        presetsError={model.presetsError}
        status={attestation?.upload.status ?? NO_UPLOAD}
        onUpload={(name, preset, file) => {
          if (!attestation) {
            return;
          }
          if (!preset) {
            attestation.upload.refuse(
              'no output policy to choose from: the server offered none'
            );
            return;
          }
          if (!file) {
            attestation.upload.refuse('choose a file');
            return;
          }
          void attestation.startUpload(name, preset, file);
        }}
        onCancel={() => attestation?.upload.cancel()}
      />
    </div>
  );
}
