/** Options of the client and of each call. */
import type { BackoffOptions } from "./backoff.js";

/** What the client needs of a WebSocket: the browser's, React Native's and
 * the `ws` package's all fit. */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onclose: ((ev: { code: number; reason?: string }) => void) | null;
  onerror: ((ev: any) => void) | null;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface CallOptions {
  /** How long a sent request waits for its reply, in ms (default: the client's `callTimeoutMs`). */
  timeoutMs?: number;
  /** Cancels the call while it waits to be sent or for its reply. */
  signal?: AbortSignal;
}

export interface ClientOptions {
  /** The server's `/ws` URL, or several (tried in turn, one per attempt), or
   * a function giving the URL for each attempt. */
  url: string | string[] | ((attempt: number) => string);
  /** The WebSocket class; default `globalThis.WebSocket` (browsers, React
   * Native, Node 22). In Node 20 pass the `ws` package's. */
  WebSocket?: WebSocketConstructor;
  /** An access token to sign in with as soon as the socket opens. */
  accessToken?: string;
  /**
   * Gives a fresh access token: called when the server announces
   * `auth.expiring`, and when a call meets `token_expired`. Typically it calls
   * `client.auth.refresh({ refresh_token })`, stores the rotated refresh
   * token and returns the access token. Return null to stay signed out.
   */
  refreshToken?: () => Promise<string | null>;
  /** The last user event `seq` the app has applied (persisted across app
   * launches): the first sign-in resumes after it. Default: the user's
   * `event_seq` at sign-in (no history replayed). */
  lastEventSeq?: number;
  /** Reply timeout for calls, in ms (default 10000). */
  callTimeoutMs?: number;
  /** Calls on the wire at once; more wait their turn (the server's default limit is 32). */
  maxInFlight?: number;
  /** Reconnect delays, or false to stay disconnected after a drop. */
  reconnect?: BackoffOptions | false;
  /** Open the socket at construction (default true); else at `connect()` or the first call. */
  autoConnect?: boolean;
  /** Makes the `client_msg_id` of a `chat.send` that has none (default crypto.randomUUID). */
  newId?: () => string;
}
