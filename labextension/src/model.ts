/**
 * The models behind the attestation panel: one {@link AttestationModel} per kernel, and a {@link ConfnbModel}
 * that follows the notebooks so the panel and badge always speak about the current notebook's kernel.
 *
 * A kernel counts as verified only when three things hold: the Jupyter server verified the evidence, this
 * browser verified the same evidence itself (WebCrypto, pinned AMD roots, the nonce it chose), and the two
 * agree on what they saw. The browser's own check is what keeps a compromised Jupyter server from showing a
 * green panel over evidence it altered.
 */

import { ISessionContext } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { Kernel, ServerConnection } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

import { dpDatasetIds, readBudget, readPrivacy } from './privacy';
import { firstLine, requestAPI } from './request';
import {
  BadgeState,
  BudgetState,
  IAttestationPolicy,
  IAttestationResponse,
  IAttestationState,
  IBudgetsResponse,
  ICheck,
  IDatasetPolicy,
  IEvidenceBundle,
  IPoliciesResponse,
  IUploadPolicyPreset
} from './tokens';
import { UploadModel } from './upload/model';
import { BrowserVerdict, verifyEvidence } from './verify';

/** 32 bytes: the most a `confnb_attestation_request` nonce carries into the claims (64 hex characters). */
const NONCE_BYTES = 32;

/** A fresh random nonce, hex: the browser chooses it so that old evidence cannot be replayed to it. */
export function freshNonce(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(NONCE_BYTES));
  return Array.from(bytes, byte => byte.toString(16).padStart(2, '0')).join('');
}

function check(name: string, ok: boolean, detail: string): ICheck {
  return { name, ok, outcome: ok ? 'pass' : 'fail', detail };
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function isCheck(value: unknown): value is ICheck {
  return (
    isObject(value) &&
    typeof value.name === 'string' &&
    typeof value.ok === 'boolean' &&
    (value.outcome === 'pass' ||
      value.outcome === 'fail' ||
      value.outcome === 'skip') &&
    typeof value.detail === 'string'
  );
}

/** Where the server's response departs from the documented shape (empty when it does not). */
function responseProblems(response: unknown): string[] {
  if (!isObject(response)) {
    return ['the attestation response is not a JSON object'];
  }
  const problems: string[] = [];
  if (typeof response.confidential !== 'boolean') {
    problems.push(
      'the attestation response does not say whether the kernel is confidential'
    );
  }
  if (response.status !== 'verified' && response.status !== 'failed') {
    problems.push(
      `the attestation response has status ${JSON.stringify(response.status)}`
    );
  }
  if (
    response.checks !== undefined &&
    !(Array.isArray(response.checks) && response.checks.every(isCheck))
  ) {
    problems.push('the attestation response carries malformed checks');
  }
  if (
    response.evidence !== undefined &&
    response.evidence !== null &&
    !isObject(response.evidence)
  ) {
    problems.push(
      'the attestation response carries evidence that is not an object'
    );
  }
  return problems;
}

/**
 * Do the server and the browser tell the same story? Both could be right to fail for different reasons, so
 * `ok` here means agreement, not success; the overall verdict still needs both to pass.
 */
export function agreementCheck(
  server: IAttestationResponse,
  browser: BrowserVerdict,
  nonce: string
): ICheck {
  const serverOk = server.status === 'verified';
  const differences: string[] = [];
  if (serverOk !== browser.ok) {
    differences.push(
      `the server says ${server.status}, this browser says ${browser.ok ? 'verified' : 'failed'}`
    );
  }
  const serverMeasurement = (server.claims?.measurement ?? '').toLowerCase();
  const browserMeasurement = (browser.report?.measurement ?? '').toLowerCase();
  if (serverMeasurement !== browserMeasurement) {
    differences.push(
      `measurements differ (server ${serverMeasurement.slice(0, 16) || 'none'}…, ` +
        `browser ${browserMeasurement.slice(0, 16) || 'none'}…)`
    );
  }
  if (Boolean(server.simulated) !== browser.simulated) {
    differences.push(
      `the server says the TEE is ${server.simulated ? '' : 'not '}simulated, ` +
        `this browser says it is ${browser.simulated ? '' : 'not '}`
    );
  }
  if (server.nonce !== undefined && server.nonce.toLowerCase() !== nonce) {
    differences.push(
      'the server answered for a different nonce than this browser asked for'
    );
  }
  if (differences.length) {
    return check('agreement', false, differences.join('; '));
  }
  const what = serverOk ? 'verified' : 'failed';
  return check(
    'agreement',
    true,
    `server and browser agree: ${what}, measurement ${browserMeasurement.slice(0, 16) || 'none'}…` +
      (browser.simulated ? ', SIMULATED' : '')
  );
}

function initialState(kernelId: string): IAttestationState {
  return {
    kernelId,
    status: 'pending',
    confidential: true,
    simulated: false,
    nonce: '',
    verifyMs: null,
    summary: 'Waiting for the kernel…',
    checks: [],
    claims: null,
    policy: null,
    evidence: null,
    verifiedAt: null
  };
}

/** The attestation of one kernel, its datasets' policies and its upload. */
export class AttestationModel {
  constructor(
    readonly kernel: Kernel.IKernelConnection,
    private readonly _settings: ServerConnection.ISettings
  ) {
    this._state = initialState(kernel.id);
    this.upload = new UploadModel();
    this.upload.changed.connect(this._onUploadChanged, this);
  }

  readonly upload: UploadModel;

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get state(): IAttestationState {
    return this._state;
  }

  get policies(): IPoliciesResponse | null {
    return this._policies;
  }

  get policiesError(): string | null {
    return this._policiesError;
  }

  /** Each DP dataset's budget by dataset id, as its owner's broker last reported it (or why it could not). */
  get budgets(): ReadonlyMap<string, BudgetState> {
    return this._budgets;
  }

  /** True once a verification has been started for the running kernel process. */
  get started(): boolean {
    return this._requested;
  }

  /** The kernel's attested HPKE key, from evidence this browser verified itself; null unless verified. */
  get verifiedHpkeKey(): string | null {
    if (this._state.status !== 'verified' || !this._state.evidence) {
      return null;
    }
    return this._state.evidence.claims.hpke_public_key ?? null;
  }

  get badgeState(): BadgeState {
    const state = this._state;
    if (!state.confidential) {
      return 'not-confidential';
    }
    if (state.status === 'verified') {
      return state.simulated ? 'simulated' : 'verified';
    }
    return state.status;
  }

  /** Forget the verdict (the kernel restarted: its evidence and keys are new). */
  reset(): void {
    this._generation++;
    this._requested = false;
    this._state = initialState(this.kernel.id);
    this._policies = null;
    this._budgets = new Map();
    this._changed.emit();
  }

  /**
   * Ask the kernel for fresh evidence over a new nonce and verify it twice (server and browser). A newer call
   * supersedes an older one still in flight, whose result is dropped.
   */
  async verify(): Promise<void> {
    const generation = ++this._generation;
    this._requested = true;
    const nonce = freshNonce();
    const started = performance.now();
    this._state = {
      ...initialState(this.kernel.id),
      nonce,
      summary: 'Verifying the kernel’s evidence…'
    };
    this._changed.emit();

    let next: IAttestationState;
    try {
      next = await this._verify(nonce, started);
    } catch (error) {
      next = {
        ...initialState(this.kernel.id),
        nonce,
        status: 'failed',
        verifyMs: performance.now() - started,
        summary: firstLine(error),
        checks: [check('evidence', false, firstLine(error))]
      };
    }
    if (generation !== this._generation || this._disposed) {
      return;
    }
    this._state = next;
    this._changed.emit();
    void this.refreshPolicies();
  }

  /** Reload the display policy and the opened datasets' output policies from the kernel. */
  async refreshPolicies(): Promise<void> {
    const generation = this._generation;
    try {
      const policies = await requestAPI<IPoliciesResponse>(
        `kernels/${encodeURIComponent(this.kernel.id)}/policies`,
        this._settings
      );
      if (!isObject(policies) || !Array.isArray(policies.datasets)) {
        throw new Error('the policies response is malformed');
      }
      if (generation !== this._generation || this._disposed) {
        return;
      }
      this._policies = {
        ...policies,
        datasets: policies.datasets.map(dataset => ({
          ...dataset,
          privacy: readPrivacy(dataset.privacy)
        }))
      };
      this._policiesError = null;
    } catch (error) {
      if (generation !== this._generation || this._disposed) {
        return;
      }
      this._policiesError = firstLine(error);
    }
    this._changed.emit();
    void this.refreshBudgets();
  }

  /**
   * Ask the owners' brokers (through the server extension, which proxies their public budget endpoint) how much
   * of each DP dataset's budget is spent. Never blocks the policies: until the answer comes, a budget shown
   * before stays, a new one says it is being asked for; a failure makes every budget "unavailable", saying why.
   */
  async refreshBudgets(): Promise<void> {
    const ids = dpDatasetIds(this._policies?.datasets ?? []);
    if (ids.length === 0) {
      if (this._budgets.size) {
        this._budgets = new Map();
        this._changed.emit();
      }
      return;
    }
    const generation = this._generation;
    const request = ++this._budgetRequest;
    this._budgets = new Map(
      ids.map(id => [
        id,
        this._budgets.get(id) ?? { dataset_id: id, status: 'loading' }
      ])
    );
    this._changed.emit();
    let next: Map<string, BudgetState>;
    try {
      const response = await requestAPI<IBudgetsResponse>(
        `kernels/${encodeURIComponent(this.kernel.id)}/budgets`,
        this._settings
      );
      const budgets = isObject(response) ? response.budgets : undefined;
      if (!isObject(budgets)) {
        throw new Error('the budgets response is malformed');
      }
      next = new Map(ids.map(id => [id, readBudget(id, budgets[id])]));
    } catch (error) {
      const reason = firstLine(error);
      next = new Map(
        ids.map(id => [
          id,
          { dataset_id: id, status: 'unavailable', broker: null, reason }
        ])
      );
    }
    if (
      generation !== this._generation ||
      request !== this._budgetRequest ||
      this._disposed
    ) {
      return;
    }
    this._budgets = next;
    this._changed.emit();
  }

  /** Encrypt `file` in this browser for this kernel's attested key and send it through the `confnb.upload` comm. */
  async startUpload(
    name: string,
    preset: IUploadPolicyPreset,
    file: File
  ): Promise<void> {
    const key = this.verifiedHpkeKey;
    if (key === null) {
      this.upload.refuse(
        'upload is possible only to a kernel this browser has verified'
      );
      return;
    }
    await this.upload.start(this.kernel, key, {
      name,
      policy: preset.toml,
      file
    });
    if (this.upload.status.state === 'done') {
      await this.refreshPolicies();
    }
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    this.upload.dispose();
    Signal.clearData(this);
  }

  private async _verify(
    nonce: string,
    started: number
  ): Promise<IAttestationState> {
    const response = await requestAPI<unknown>(
      `kernels/${encodeURIComponent(this.kernel.id)}/attestation?nonce=${nonce}`,
      this._settings
    );
    const problems = responseProblems(response);
    if (problems.length) {
      throw new Error(problems.join('; '));
    }
    const server = response as IAttestationResponse;
    const base: IAttestationState = {
      ...initialState(this.kernel.id),
      nonce,
      confidential: server.confidential,
      summary: server.summary,
      checks: [...(server.checks ?? [])],
      claims: server.claims ?? null,
      policy: server.attestation_policy ?? null,
      evidence: server.evidence ?? null,
      verifiedAt: server.verified_at ?? null,
      simulated: Boolean(server.simulated)
    };
    if (!server.confidential) {
      return {
        ...base,
        status: 'failed',
        verifyMs: performance.now() - started
      };
    }
    if (!server.evidence) {
      return {
        ...base,
        status: 'failed',
        verifyMs: performance.now() - started,
        checks: [
          ...base.checks,
          check(
            'browser.evidence',
            false,
            'the server returned no evidence to verify'
          )
        ]
      };
    }
    const policy: IAttestationPolicy = server.attestation_policy ?? {};
    const browser = await verifyEvidence(server.evidence as IEvidenceBundle, {
      nonce,
      allowSimulated: policy.allow_simulated === true,
      simulatedRoots: Array.isArray(policy.simulated_roots)
        ? policy.simulated_roots
        : []
    });
    const agreement = agreementCheck(server, browser, nonce);
    const checks: ICheck[] = [
      ...base.checks,
      ...browser.checks.map(item => ({
        ...item,
        name: `browser.${item.name}`
      })),
      agreement
    ];
    const verified = server.status === 'verified' && browser.ok && agreement.ok;
    const failing = checks.filter(item => !item.ok).map(item => item.name);
    const summary = verified
      ? `${server.summary} — confirmed by this browser`
      : `not verified: ${failing.length ? failing.join(', ') : server.summary}`;
    return {
      ...base,
      status: verified ? 'verified' : 'failed',
      // The badge and banner must say SIMULATED if either side saw a simulated root.
      simulated: browser.simulated || base.simulated,
      checks,
      summary,
      verifyMs: performance.now() - started
    };
  }

  private _onUploadChanged(): void {
    this._changed.emit();
  }

  private _state: IAttestationState;
  private _policies: IPoliciesResponse | null = null;
  private _policiesError: string | null = null;
  private _budgets: ReadonlyMap<string, BudgetState> = new Map();
  private _budgetRequest = 0;
  private _generation = 0;
  private _requested = false;
  private _disposed = false;
  private _changed = new Signal<this, void>(this);
}

/** Kernel states in which the kernel answers on its channels. */
const LIVE_STATUSES: ReadonlySet<Kernel.Status> = new Set<Kernel.Status>([
  'idle',
  'busy'
]);
/** Kernel states after which the kernel process (and so its evidence and keys) is new. */
const RESTART_STATUSES: ReadonlySet<Kernel.Status> = new Set<Kernel.Status>([
  'restarting',
  'autorestarting',
  'starting',
  'dead'
]);

/**
 * Follows every open notebook's kernel, verifies each as soon as it is live, and exposes the one of the current
 * notebook to the panel and the badge.
 */
export class ConfnbModel {
  constructor(
    private readonly _tracker: INotebookTracker,
    readonly settings: ServerConnection.ISettings
  ) {
    _tracker.widgetAdded.connect(this._onNotebookAdded, this);
    _tracker.currentChanged.connect(this._emit, this);
    _tracker.forEach(panel => this._onNotebookAdded(_tracker, panel));
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** The attestation of the current notebook's kernel, or null when there is no notebook or no kernel. */
  get current(): AttestationModel | null {
    const kernel = this._tracker.currentWidget?.sessionContext.session?.kernel;
    return kernel ? (this._models.get(kernel.id) ?? null) : null;
  }

  /** True when a notebook is current (its kernel may still be starting). */
  get hasNotebook(): boolean {
    return this._tracker.currentWidget !== null;
  }

  get presets(): IUploadPolicyPreset[] {
    return this._presets;
  }

  get presetsError(): string | null {
    return this._presetsError;
  }

  /** The output policies the upload form offers, from the server extension. */
  async loadPresets(): Promise<void> {
    try {
      const presets = await requestAPI<unknown>(
        'upload-policies',
        this.settings
      );
      if (
        !Array.isArray(presets) ||
        !presets.every(
          item =>
            isObject(item) &&
            typeof item.id === 'string' &&
            typeof item.toml === 'string'
        )
      ) {
        throw new Error('the upload policies response is malformed');
      }
      this._presets = presets as IUploadPolicyPreset[];
      this._presetsError = null;
    } catch (error) {
      this._presetsError = firstLine(error);
    }
    this._emit();
  }

  /** Verify the current kernel again with a fresh nonce. */
  async verifyCurrent(): Promise<void> {
    if (this._presets.length === 0) {
      void this.loadPresets();
    }
    await this.current?.verify();
  }

  dispose(): void {
    for (const model of this._models.values()) {
      model.dispose();
    }
    this._models.clear();
    Signal.clearData(this);
  }

  /** Every datasets' policies entry of the current kernel, for callers that only need the list. */
  get currentDatasets(): IDatasetPolicy[] {
    return this.current?.policies?.datasets ?? [];
  }

  private _onNotebookAdded(_: INotebookTracker, panel: NotebookPanel): void {
    const context = panel.sessionContext;
    const follow = (): void => this._follow(context);
    context.kernelChanged.connect(follow, this);
    context.statusChanged.connect(follow, this);
    context.connectionStatusChanged.connect(follow, this);
    panel.disposed.connect(() => {
      context.kernelChanged.disconnect(follow, this);
      context.statusChanged.disconnect(follow, this);
      context.connectionStatusChanged.disconnect(follow, this);
      this._emit();
    });
    follow();
  }

  private _follow(context: ISessionContext): void {
    const kernel = context.session?.kernel;
    if (kernel) {
      let model = this._models.get(kernel.id);
      if (!model) {
        model = new AttestationModel(kernel, this.settings);
        this._models.set(kernel.id, model);
        model.changed.connect(this._emit, this);
        const id = kernel.id;
        kernel.disposed.connect(() => {
          const gone = this._models.get(id);
          if (gone) {
            this._models.delete(id);
            gone.dispose();
            this._emit();
          }
        });
      }
      const status = kernel.status;
      if (RESTART_STATUSES.has(status) && model.started) {
        model.reset();
      } else if (
        LIVE_STATUSES.has(status) &&
        kernel.connectionStatus === 'connected' &&
        !model.started
      ) {
        void model.verify();
      }
    }
    this._emit();
  }

  private _emit(): void {
    this._changed.emit();
  }

  private _models = new Map<string, AttestationModel>();
  private _presets: IUploadPolicyPreset[] = [];
  private _presetsError: string | null = null;
  private _changed = new Signal<this, void>(this);
}
