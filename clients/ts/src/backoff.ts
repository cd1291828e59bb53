/**
 * Reconnect delays: exponential backoff with full jitter (each delay drawn
 * uniformly from [0, min(cap, base * 2^attempt))). Jitter spreads the
 * reconnects of many devices that lost one server at the same moment, so
 * they do not come back as one wave.
 */
export interface BackoffOptions {
  /** The first attempt's upper bound, in ms. */
  baseMs?: number;
  /** No delay is longer than this, in ms. */
  capMs?: number;
  /** A source of [0, 1) numbers (tests may pin it). */
  random?: () => number;
}

export const DEFAULT_BACKOFF = { baseMs: 500, capMs: 30_000 } as const;

/** The largest delay attempt `attempt` (0 = the first reconnect) may wait. */
export function backoffCeiling(attempt: number, options: BackoffOptions = {}): number {
  const base = options.baseMs ?? DEFAULT_BACKOFF.baseMs;
  const cap = options.capMs ?? DEFAULT_BACKOFF.capMs;
  return Math.min(cap, base * 2 ** Math.min(attempt, 30));
}

export function backoffDelay(attempt: number, options: BackoffOptions = {}): number {
  const random = options.random ?? Math.random;
  return Math.floor(random() * backoffCeiling(attempt, options));
}
