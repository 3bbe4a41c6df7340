/**
 * Shapes shared by the panel, its models and the confnb server extension's REST API
 * (`{base_url}confnb/api/...`). The server's JSON is read through these types only after a runtime check in
 * `model.ts`: a Jupyter server is not trusted to send what it promises.
 */

export type Outcome = 'pass' | 'fail' | 'skip';

/** One named check, as the server and the browser verifier both report it. */
export interface ICheck {
  name: string;
  ok: boolean;
  outcome: Outcome;
  detail: string;
}

/** A TCB version as the server flattens it from the report. */
export interface ITcb {
  bootloader: number;
  tee: number;
  snp: number;
  microcode: number;
  fmc?: number;
  raw?: string;
}

/** The report fields the panel shows (server response `claims`). */
export interface IReportClaims {
  product?: string | null;
  measurement?: string;
  tcb_current?: ITcb;
  tcb_reported?: ITcb;
  tcb_committed?: ITcb;
  policy_bits?: Record<string, boolean>;
  chip_id?: string;
  vmpl?: number;
  report_time?: string;
  signing_key?: string;
  report_version?: number;
  tee?: string;
}

/** The analyst's attestation policy as the server applied it. */
export interface IAttestationPolicy {
  allow_simulated?: boolean;
  /** SHA-256 hex of the DER of simulated ARK certificates the policy accepts. */
  simulated_roots?: string[];
  measurements?: string[];
  min_tcb?: Record<string, unknown>;
  [key: string]: unknown;
}

/** The `confnb-evidence/1` bundle, exactly as the kernel sent it. */
export interface IEvidenceBundle {
  format: string;
  tee: string;
  report: string;
  certs: { vek?: string; chain: string[] };
  claims: Record<string, string>;
}

/** `GET kernels/{id}/attestation?nonce=...`. */
export interface IAttestationResponse {
  kernel_id: string;
  confidential: boolean;
  status: 'verified' | 'failed';
  simulated?: boolean;
  nonce?: string;
  summary: string;
  checks?: ICheck[];
  claims?: IReportClaims;
  attestation_policy?: IAttestationPolicy;
  evidence?: IEvidenceBundle;
  verified_at?: string;
}

/** Exact mode: exact numbers under the release rules that protect them (the server applies their defaults). */
export interface IExactPrivacy {
  mode: 'exact';
  min_group_size: number;
  difference_checks: boolean;
}

/** Differential privacy: the owner's canonical `[privacy]` table (bounds and keys are not shown). */
export interface IDpPrivacy {
  mode: 'dp';
  /** The dataset's total budget. */
  epsilon: number;
  delta: number;
  /** Absent: one kernel may spend the whole budget. */
  epsilon_per_kernel?: number;
  /** The column naming a person; absent: one row is one person. */
  unit?: string;
  max_contributions: number;
  /** Exact release kinds still allowed besides the schema. */
  public?: string[];
}

/** A dataset's privacy mode; null when the kernel reported a policy the server could not read. */
export type PrivacyView = IExactPrivacy | IDpPrivacy;

/** One dataset the kernel's vault has opened, with its output policy in plain language. */
export interface IDatasetPolicy {
  id: string;
  policy_id: string;
  source: 'broker' | 'upload' | string;
  explanation: string[];
  policy: Record<string, unknown>;
  /** Checked at runtime by the model (`readPrivacy`): null when absent or malformed. */
  privacy: PrivacyView | null;
}

/** A DP dataset's budget as its owner's broker reports it (`GET kernels/{id}/budgets`, one entry). */
export interface IBudgetReport {
  dataset_id: string;
  status: 'ok';
  /** The broker that answered. */
  broker: string;
  epsilon: number;
  delta: number;
  epsilon_spent: number;
  epsilon_remaining: number;
  delta_spent: number;
  delta_remaining: number;
  /** How many releases the budget has paid for, by every kernel. */
  charges: number;
}

/** Why a DP dataset's budget cannot be shown (no broker, a timeout, a refusal, an answer about another budget). */
export interface IBudgetUnavailable {
  dataset_id: string;
  status: 'unavailable';
  broker: string | null;
  reason: string;
}

/** What the privacy section shows about one DP dataset's budget. */
export type BudgetState =
  | IBudgetReport
  | IBudgetUnavailable
  | { dataset_id: string; status: 'loading' };

/** `GET kernels/{id}/budgets`; each entry is checked at runtime (`readBudget`). */
export interface IBudgetsResponse {
  kernel_id: string;
  confidential: boolean;
  budgets: Record<string, unknown>;
}

/** `GET kernels/{id}/policies`. */
export interface IPoliciesResponse {
  kernel_id: string;
  display: Record<string, unknown>;
  withheld: Record<string, unknown>;
  datasets: IDatasetPolicy[];
}

/** One entry of `GET upload-policies`: an output policy the upload dialog offers. */
export interface IUploadPolicyPreset {
  id: string;
  title: string;
  toml: string;
  explanation: string[];
}

/** The panel's verdict on the current kernel. */
export type VerifyStatus = 'pending' | 'verified' | 'failed';

/** What the status-bar badge shows. */
export type BadgeState =
  'pending' | 'verified' | 'failed' | 'simulated' | 'not-confidential';

/** Everything the panel renders about one kernel's attestation. */
export interface IAttestationState {
  kernelId: string;
  status: VerifyStatus;
  /** False once the server says the kernel was not started by confnb's provisioner. */
  confidential: boolean;
  simulated: boolean;
  /** Hex nonce of the request whose evidence is shown (or in flight). */
  nonce: string;
  /** Milliseconds from the request's start to the verdict; null while pending. */
  verifyMs: number | null;
  summary: string;
  /** Server checks, browser checks (`browser.` prefix) and `agreement`. */
  checks: ICheck[];
  claims: IReportClaims | null;
  policy: IAttestationPolicy | null;
  evidence: IEvidenceBundle | null;
  verifiedAt: string | null;
}

export type UploadState = 'idle' | 'uploading' | 'done' | 'error' | 'cancelled';

/** What the upload form shows. */
export interface IUploadStatus {
  state: UploadState;
  message: string;
  /** Ciphertext bytes the kernel has acknowledged, and the total. */
  received: number;
  total: number;
}

/** The relay's answer to a finished upload. */
export interface IUploadResult {
  dataset: string;
  rows: number;
  columns: string[];
  policy_id: string;
}

/** The file formats the relay parses, and the file name endings that map to them. */
export type UploadFileFormat = 'csv' | 'parquet' | 'arrow';

export const UPLOAD_EXTENSIONS: Record<string, UploadFileFormat> = {
  '.csv': 'csv',
  '.parquet': 'parquet',
  '.arrow': 'arrow',
  '.feather': 'arrow'
};

/** Ids of the widgets other code (and the browser tests) look for. */
export namespace ElementIds {
  export const sidebar = 'confnb-attestation';
  export const panel = 'confnb-attestation-panel';
  export const badge = 'confnb-status-badge';
}

export namespace CommandIDs {
  export const open = 'confnb:open-attestation';
  export const verify = 'confnb:verify-again';
}
