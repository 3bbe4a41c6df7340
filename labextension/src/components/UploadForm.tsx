import * as React from 'react';

import { IUploadPolicyPreset, IUploadStatus } from '../tokens';

export interface IUploadFormProps {
  /** Only a kernel whose attestation this browser verified may receive data. */
  enabled: boolean;
  presets: IUploadPolicyPreset[];
  presetsError: string | null;
  status: IUploadStatus;
  onUpload: (
    name: string,
    preset: IUploadPolicyPreset | null,
    file: File | null
  ) => void;
  onCancel: () => void;
}

const ACCEPT = '.csv,.parquet,.arrow,.feather';

/** Encrypt a local file in this browser for the verified kernel, under an output policy the user picks. */
export function UploadForm(props: IUploadFormProps): JSX.Element {
  const { enabled, presets, presetsError, status, onUpload, onCancel } = props;
  const [name, setName] = React.useState('');
  const [presetId, setPresetId] = React.useState('');
  const [file, setFile] = React.useState<File | null>(null);
  const uploading = status.state === 'uploading';
  const chosen =
    presets.find(preset => preset.id === presetId) ?? presets[0] ?? null;

  const submit = (event: React.FormEvent): void => {
    event.preventDefault();
    if (enabled && !uploading) {
      onUpload(name.trim(), chosen, file);
    }
  };

  return (
    <section className="confnb-upload" aria-labelledby="confnb-upload-title">
      <h3 id="confnb-upload-title">Upload a dataset</h3>
      <p className="confnb-muted">
        The file is encrypted in this browser for the kernel’s attested key; the
        Jupyter server only sees ciphertext.
      </p>
      <form onSubmit={submit}>
        <label htmlFor="confnb-upload-name">Dataset name</label>
        <input
          id="confnb-upload-name"
          className="jp-mod-styled"
          type="text"
          value={name}
          pattern="[A-Za-z0-9_.\-]{1,64}"
          maxLength={64}
          placeholder="e.g. visits"
          disabled={uploading}
          onChange={event => setName(event.target.value)}
        />
        <label htmlFor="confnb-upload-policy">Output policy</label>
        <select
          id="confnb-upload-policy"
          className="jp-mod-styled"
          value={chosen?.id ?? ''}
          disabled={uploading || presets.length === 0}
          onChange={event => setPresetId(event.target.value)}
        >
          {presets.map(preset => (
            <option key={preset.id} value={preset.id}>
              {preset.title}
            </option>
          ))}
        </select>
        {presetsError ? <p className="confnb-error">{presetsError}</p> : null}
        {chosen && chosen.explanation.length ? (
          <ul
            className="confnb-preset-explanation"
            aria-label="What this policy releases"
          >
            {chosen.explanation.map((line, index) => (
              <li key={index}>{line}</li>
            ))}
          </ul>
        ) : null}
        <label htmlFor="confnb-upload-file">File (CSV, Parquet or Arrow)</label>
        <input
          id="confnb-upload-file"
          type="file"
          accept={ACCEPT}
          disabled={uploading}
          onChange={event => setFile(event.target.files?.[0] ?? null)}
        />
        <div className="confnb-buttons">
          <button
            type="submit"
            id="confnb-upload-button"
            className="jp-Button jp-mod-accept"
            disabled={!enabled || uploading}
            title={
              enabled
                ? 'Encrypt and upload'
                : 'Upload is enabled once the kernel is verified'
            }
          >
            Encrypt and upload
          </button>
          <button
            type="button"
            id="confnb-upload-cancel"
            className="jp-Button jp-mod-reject"
            disabled={!uploading}
            onClick={onCancel}
          >
            Cancel
          </button>
        </div>
      </form>
      <progress
        id="confnb-upload-progress"
        aria-label="Upload progress"
        max={status.total || 1}
        value={status.state === 'done' ? status.total || 1 : status.received}
      />
      <p
        id="confnb-upload-status"
        data-state={status.state}
        role="status"
        aria-live="polite"
      >
        {status.message ||
          (enabled
            ? 'Ready to upload.'
            : 'Upload is possible once the kernel is verified.')}
      </p>
    </section>
  );
}
