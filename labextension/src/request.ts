import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** Thrown for any failed call to the confnb server extension; the message is one line meant for the user. */
export class ConfnbRequestError extends Error {
  constructor(
    message: string,
    readonly status: number | null
  ) {
    super(message);
    this.name = 'ConfnbRequestError';
  }
}

/**
 * Call the confnb server extension. `ServerConnection.makeRequest` adds the token and the XSRF header, so the
 * handlers can stay `@web.authenticated`.
 *
 * @param endPoint path under `{base_url}confnb/api/`
 */
export async function requestAPI<T>(
  endPoint: string,
  settings: ServerConnection.ISettings = ServerConnection.makeSettings(),
  init: RequestInit = {}
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, 'confnb', 'api', endPoint);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ConfnbRequestError(
      `the Jupyter server cannot be reached: ${firstLine(error)}`,
      null
    );
  }
  const text = await response.text();
  let body: unknown = null;
  if (text.length > 0) {
    try {
      body = JSON.parse(text);
    } catch {
      throw new ConfnbRequestError(
        `the server answered ${endPoint} with something that is not JSON`,
        response.status
      );
    }
  }
  if (!response.ok) {
    const message =
      typeof body === 'object' &&
      body !== null &&
      typeof (body as { message?: unknown }).message === 'string'
        ? (body as { message: string }).message
        : response.statusText || `HTTP ${response.status}`;
    throw new ConfnbRequestError(
      `${endPoint.split('?')[0]}: ${firstLine(message)}`,
      response.status
    );
  }
  return body as T;
}

/** The first line of an error's message: the UI shows one-line reasons, never stacks. */
export function firstLine(error: unknown): string {
  const text = error instanceof Error ? error.message : String(error);
  return text.split('\n', 1)[0];
}
