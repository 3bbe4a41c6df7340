/**
 * The browser side of the `confnb.upload` comm: the file is encrypted here, for the kernel's attested HPKE key,
 * and only ciphertext goes through the Jupyter server to the kernel's relay.
 *
 * At most {@link MAX_IN_FLIGHT} chunks are unacknowledged at any time, so neither the browser nor the relay holds
 * more than a couple of 1 MiB segments whatever the size of the file.
 */

import { Kernel, KernelMessage } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

import { firstLine } from '../request';
import {
  IUploadResult,
  IUploadStatus,
  UPLOAD_EXTENSIONS,
  UploadFileFormat,
  UploadState
} from '../tokens';
import { UploadDescriptor, UploadEncryptor } from './encrypt';

export const UPLOAD_TARGET = 'confnb.upload';
export const MAX_IN_FLIGHT = 2;
/** The relay answers `begin` after opening the sealed key: quick, unless the kernel is busy starting. */
const READY_TIMEOUT_MS = 30_000;
const PROGRESS_TIMEOUT_MS = 60_000;
/** `end` authenticates the whole stream and parses it with pyarrow inside the vault. */
const DONE_TIMEOUT_MS = 600_000;
const CANCEL_TIMEOUT_MS = 10_000;
const DATASET_NAME = /^[A-Za-z0-9_.-]{1,64}$/;

/** What the user asked to upload. */
export interface IUploadRequest {
  name: string;
  /** TOML text of the output policy. */
  policy: string;
  file: File;
}

/** One reply of the relay on the upload comm. */
export type UploadReply =
  | { action: 'ready' }
  | { action: 'progress'; seq: number; received: number }
  | ({ action: 'done' } & IUploadResult)
  | { action: 'error'; message: string }
  | { action: 'cancelled' };

/** The upload was cancelled by the user (not an error). */
class UploadCancelled extends Error {}

/** Parse a relay message; anything off-protocol becomes an error reply, so the upload fails closed. */
export function parseReply(data: unknown): UploadReply {
  if (typeof data !== 'object' || data === null) {
    return {
      action: 'error',
      message: 'the kernel sent an upload message that is not an object'
    };
  }
  const message = data as Record<string, unknown>;
  switch (message.action) {
    case 'ready':
    case 'cancelled':
      return { action: message.action };
    case 'progress':
      if (
        typeof message.seq === 'number' &&
        typeof message.received === 'number'
      ) {
        return {
          action: 'progress',
          seq: message.seq,
          received: message.received
        };
      }
      break;
    case 'done':
      if (
        typeof message.dataset === 'string' &&
        typeof message.rows === 'number'
      ) {
        return {
          action: 'done',
          dataset: message.dataset,
          rows: message.rows,
          columns: Array.isArray(message.columns)
            ? message.columns.map(String)
            : [],
          policy_id:
            typeof message.policy_id === 'string' ? message.policy_id : ''
        };
      }
      break;
    case 'error':
      return {
        action: 'error',
        message: firstLine(
          typeof message.message === 'string'
            ? message.message
            : 'the kernel refused the upload'
        )
      };
  }
  return {
    action: 'error',
    message: `the kernel sent an unexpected upload message (${String(message.action)})`
  };
}

/** The file format the relay should parse, from the file name; null when the ending is not one it reads. */
export function fileFormatOf(filename: string): UploadFileFormat | null {
  const dot = filename.lastIndexOf('.');
  return dot < 0
    ? null
    : (UPLOAD_EXTENSIONS[filename.slice(dot).toLowerCase()] ?? null);
}

/** Why this upload cannot start, in one line; null when it can. */
export function requestProblem(
  request: Partial<IUploadRequest>
): string | null {
  if (!request.name || !DATASET_NAME.test(request.name)) {
    return 'the dataset name must be 1 to 64 letters, digits, dots, dashes or underscores';
  }
  if (!request.policy) {
    return 'choose an output policy';
  }
  if (!request.file) {
    return 'choose a file';
  }
  if (fileFormatOf(request.file.name) === null) {
    return 'the file must be .csv, .parquet, .arrow or .feather';
  }
  return null;
}

function base64(bytes: Uint8Array): string {
  let binary = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

/**
 * An ArrayBuffer holding exactly these bytes: JupyterLab's message serializer sends a view's whole underlying
 * buffer, which for a subarray would leak bytes around it and corrupt the stream.
 */
function exactArrayBuffer(bytes: Uint8Array): ArrayBuffer {
  if (
    bytes.byteOffset === 0 &&
    bytes.byteLength === bytes.buffer.byteLength &&
    bytes.buffer instanceof ArrayBuffer
  ) {
    return bytes.buffer;
  }
  return bytes.slice().buffer as ArrayBuffer;
}

/** Replies of the relay, in order, to whoever awaits the next one. */
class ReplyQueue {
  push(reply: UploadReply): void {
    const waiter = this._waiters.shift();
    if (waiter) {
      waiter.resolve(reply);
    } else {
      this._replies.push(reply);
    }
  }

  /** Fail every present and future wait (the comm closed, or the user cancelled). */
  fail(error: Error): void {
    this._error = error;
    for (const waiter of this._waiters.splice(0)) {
      waiter.reject(error);
    }
  }

  /** Reject the current wait only: the caller goes on to the cancel handshake on the same queue. */
  interrupt(error: Error): void {
    for (const waiter of this._waiters.splice(0)) {
      waiter.reject(error);
    }
  }

  next(timeoutMs: number, what: string): Promise<UploadReply> {
    const queued = this._replies.shift();
    if (queued) {
      return Promise.resolve(queued);
    }
    if (this._error) {
      return Promise.reject(this._error);
    }
    return new Promise<UploadReply>((resolve, reject) => {
      const timer = setTimeout(() => {
        this._waiters = this._waiters.filter(waiter => waiter.resolve !== done);
        reject(
          new Error(
            `the kernel did not ${what} within ${Math.round(timeoutMs / 1000)} s`
          )
        );
      }, timeoutMs);
      const done = (reply: UploadReply): void => {
        clearTimeout(timer);
        resolve(reply);
      };
      this._waiters.push({
        resolve: done,
        reject: (error: Error) => {
          clearTimeout(timer);
          reject(error);
        }
      });
    });
  }

  private _replies: UploadReply[] = [];
  private _waiters: {
    resolve: (reply: UploadReply) => void;
    reject: (error: Error) => void;
  }[] = [];
  private _error: Error | null = null;
}

const IDLE: IUploadStatus = {
  state: 'idle',
  message: '',
  received: 0,
  total: 0
};

/** One upload at a time per kernel: its state, progress and result. */
export class UploadModel {
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get status(): IUploadStatus {
    return this._status;
  }

  get result(): IUploadResult | null {
    return this._result;
  }

  get busy(): boolean {
    return this._status.state === 'uploading';
  }

  /** Show why an upload cannot start, without starting one. */
  refuse(message: string): void {
    this._set('error', firstLine(message));
  }

  /** Encrypt and send `request.file`; resolves when the upload is done, failed or cancelled (never rejects). */
  async start(
    kernel: Kernel.IKernelConnection,
    hpkePublicKeyB64: string,
    request: IUploadRequest
  ): Promise<void> {
    if (this.busy) {
      return;
    }
    const problem = requestProblem(request);
    if (problem) {
      this.refuse(problem);
      return;
    }
    this._result = null;
    this._cancelRequested = false;
    const queue = new ReplyQueue();
    this._queue = queue;
    let comm: Kernel.IComm | null = null;
    this._set('uploading', `Encrypting ${request.file.name} for the kernel…`);
    try {
      const descriptor: UploadDescriptor = {
        format: 'confnb-upload/1',
        name: request.name,
        file_format: fileFormatOf(request.file.name) as UploadFileFormat,
        filename: request.file.name,
        policy: request.policy
      };
      const encryptor = await UploadEncryptor.create(
        hpkePublicKeyB64,
        descriptor
      );
      const total = encryptor.ciphertextSize(request.file.size);
      this._set('uploading', `Sending ${request.name} (encrypted)…`, 0, total);

      // eslint-disable-next-line jupyter/require-disposable-transfer -- closed (which disposes it) in `finally`
      comm = kernel.createComm(UPLOAD_TARGET);
      comm.onMsg = (msg: KernelMessage.ICommMsgMsg) =>
        queue.push(parseReply(msg.content.data));
      comm.onClose = () =>
        queue.fail(new Error('the kernel closed the upload'));
      comm.open({
        action: 'begin',
        descriptor: { ...descriptor },
        sealed_key: base64(encryptor.sealedKey),
        ciphertext_size: total
      });
      this._throwIfCancelled();
      expectAction(
        await queue.next(READY_TIMEOUT_MS, 'accept the upload'),
        'ready'
      );

      let seq = 0;
      let inFlight = 0;
      let received = 0;
      const acknowledge = async (): Promise<void> => {
        const reply = expectAction(
          await queue.next(PROGRESS_TIMEOUT_MS, 'acknowledge a chunk'),
          'progress'
        );
        if (reply.received < received || reply.received > total) {
          throw new Error(
            `the kernel reports ${reply.received} bytes received, out of order`
          );
        }
        received = reply.received;
        inFlight--;
        this._set(
          'uploading',
          `Sending ${request.name} (encrypted)…`,
          received,
          total
        );
      };
      for await (const segment of encryptor.segments(request.file)) {
        this._throwIfCancelled();
        while (inFlight >= MAX_IN_FLIGHT) {
          await acknowledge();
        }
        comm.send({ action: 'chunk', seq }, {}, [exactArrayBuffer(segment)]);
        seq++;
        inFlight++;
      }
      while (inFlight > 0) {
        await acknowledge();
      }
      if (received !== total) {
        throw new Error(`the kernel received ${received} of ${total} bytes`);
      }
      this._throwIfCancelled();
      this._set(
        'uploading',
        `Sealing ${request.name} in the kernel…`,
        received,
        total
      );
      comm.send({ action: 'end' });
      const done = expectAction(
        await queue.next(DONE_TIMEOUT_MS, 'finish the upload'),
        'done'
      );
      this._result = {
        dataset: done.dataset,
        rows: done.rows,
        columns: done.columns,
        policy_id: done.policy_id
      };
      this._set(
        'done',
        `${done.dataset}: ${done.rows.toLocaleString()} rows sealed in the kernel`,
        total,
        total
      );
    } catch (error) {
      if (error instanceof UploadCancelled) {
        await this._cancelHandshake(comm, queue);
        this._set(
          'cancelled',
          'Upload cancelled; the kernel discarded what it had received'
        );
      } else {
        this._set('error', `Upload failed: ${firstLine(error)}`);
      }
    } finally {
      this._queue = null;
      closeQuietly(comm);
    }
  }

  /** Stop the upload in progress; the kernel discards everything it received. */
  cancel(): void {
    if (!this.busy || this._cancelRequested) {
      return;
    }
    this._cancelRequested = true;
    this._queue?.interrupt(new UploadCancelled('cancelled'));
  }

  dispose(): void {
    this.cancel();
    Signal.clearData(this);
  }

  private _throwIfCancelled(): void {
    if (this._cancelRequested) {
      throw new UploadCancelled('cancelled');
    }
  }

  private async _cancelHandshake(
    comm: Kernel.IComm | null,
    queue: ReplyQueue
  ): Promise<void> {
    if (!comm || comm.isDisposed) {
      return;
    }
    try {
      comm.send({ action: 'cancel' });
      // Acknowledgements of chunks already sent may come first.
      for (;;) {
        const reply = await queue.next(
          CANCEL_TIMEOUT_MS,
          'confirm the cancellation'
        );
        if (reply.action === 'cancelled' || reply.action === 'error') {
          return;
        }
      }
    } catch {
      // Closing the comm discards the upload on the kernel's side as well.
    }
  }

  private _set(
    state: UploadState,
    message: string,
    received = 0,
    total = 0
  ): void {
    this._status = { state, message, received, total };
    this._changed.emit();
  }

  private _status: IUploadStatus = IDLE;
  private _result: IUploadResult | null = null;
  private _cancelRequested = false;
  private _queue: ReplyQueue | null = null;
  private _changed = new Signal<this, void>(this);
}

function expectAction<A extends UploadReply['action']>(
  reply: UploadReply,
  action: A
): Extract<UploadReply, { action: A }> {
  if (reply.action === 'error') {
    throw new Error(reply.message);
  }
  if (reply.action !== action) {
    throw new Error(
      `the kernel answered '${reply.action}' where '${action}' was expected`
    );
  }
  return reply as Extract<UploadReply, { action: A }>;
}

function closeQuietly(comm: Kernel.IComm | null): void {
  if (comm && !comm.isDisposed) {
    try {
      comm.close();
    } catch {
      // The kernel connection is gone; nothing is left to close.
    }
  }
}
