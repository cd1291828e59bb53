/** Events of the client itself (not the server's): connection state and session. */
import type { Methods } from "./generated/api.js";

export type ConnectionState = "connecting" | "restoring" | "ready" | "disconnected" | "closed";

export interface ClientEvents {
  /** The connection changed state; "ready" = open, signed in again, resumed, re-joined. */
  state: { state: ConnectionState };
  /** A reconnect is scheduled after `delayMs` (attempt 0 is the first after a drop). */
  reconnecting: { attempt: number; delayMs: number; code?: number };
  /** The socket is bound to this user (sign-in, re-authentication, token refresh). */
  authenticated: { user: Methods["users.me"]["result"] };
  /** The session ended: "logout", or the token was refused on reconnect. */
  signedOut: { reason: string };
  /** Some user events after `since_seq` are no longer kept: re-read state
   * (users.me, bookings.list, wallet.transactions). */
  truncated: { since_seq: number; last_seq: number };
  /** A re-join found more missed messages than it returns: page back with chat.history. */
  roomTruncated: { conversation_id: string };
  /** A re-join was refused (`code`: not_found, forbidden): the room is no longer followed. */
  roomLeft: { conversation_id: string; code: string };
  /** Something went wrong outside any call (a bad frame, a failed refresh). */
  error: Error;
}
