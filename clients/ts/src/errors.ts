/** Errors a call can end with. Apps branch on `RpcError.code`, never on text. */

export interface FieldError {
  field: string;
  reason: string;
}

/** The server answered the call with an error frame. */
export class RpcError extends Error {
  readonly code: string;
  readonly data: Record<string, unknown> | undefined;
  readonly method: string;

  constructor(method: string, code: string, message: string, data?: Record<string, unknown>) {
    super(`${method}: ${code}: ${message}${describeFields(data)}`);
    this.name = "RpcError";
    this.method = method;
    this.code = code;
    this.data = data;
  }

  /** For `invalid_params`: every failing field and why. */
  get fieldErrors(): FieldError[] {
    const errors = this.data?.errors;
    return Array.isArray(errors) ? (errors as FieldError[]) : [];
  }
}

function describeFields(data: Record<string, unknown> | undefined): string {
  const errors = data?.errors;
  if (!Array.isArray(errors) || errors.length === 0) return "";
  return " (" + errors.map((e: FieldError) => `${e.field}: ${e.reason}`).join("; ") + ")";
}

/** The request was sent but no reply came within its timeout. Whether it took
 * effect is unknown; calls that are safe to repeat can simply be made again. */
export class TimeoutError extends Error {
  readonly method: string;
  constructor(method: string, ms: number) {
    super(`${method}: no reply within ${ms} ms`);
    this.name = "TimeoutError";
    this.method = method;
  }
}

/** The socket dropped while a call that is not safe to repeat (sign-in,
 * token refresh, logout) was on the wire: it may or may not have happened. */
export class ConnectionLostError extends Error {
  readonly method: string;
  constructor(method: string) {
    super(`${method}: the connection dropped before the reply; the outcome is unknown`);
    this.name = "ConnectionLostError";
    this.method = method;
  }
}

/** The client was closed (or the call aborted) before the call finished. */
export class ClientClosedError extends Error {
  constructor(message = "the client is closed") {
    super(message);
    this.name = "ClientClosedError";
  }
}
