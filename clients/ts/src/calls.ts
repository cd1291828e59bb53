/**
 * The calls of one client, whatever the socket: those waiting to be sent
 * (in the order they were made), those on the wire (by request id), and
 * those given up on that the server still counts in flight. Knows nothing of
 * sockets or sessions; the client decides what may be sent and when.
 */
import { encodeFrame } from "./codec.js";
import { ClientClosedError, TimeoutError } from "./errors.js";
import type { CallOptions } from "./options.js";

export interface PendingCall {
  readonly n: number; // the order calls were made in, kept when one is queued again
  readonly method: string;
  readonly params: Record<string, unknown>;
  readonly internal: boolean; // the client's own (restoring a session)
  refreshed: boolean; // already tried again after a token refresh
  done: boolean;
  id: number | undefined; // while on the wire
  readonly timeoutMs: number;
  readonly signal: AbortSignal | undefined;
  onAbort: (() => void) | undefined;
  timer: ReturnType<typeof setTimeout> | undefined;
  resolve: (value: any) => void;
  reject: (error: unknown) => void;
}

export class Calls {
  private queue: PendingCall[] = [];
  private readonly inflight = new Map<number, PendingCall>();
  // Timed out or aborted, but the server still counts them in its in-flight limit.
  private readonly late = new Set<number>();
  private nextId = 1;
  private made = 0;

  constructor(private readonly limit: number) {}

  /** A new call, queued; the promise settles with its reply. */
  add(method: string, params: Record<string, unknown>, options: CallOptions & { timeoutMs: number }, internal: boolean): Promise<any> {
    return new Promise((resolve, reject) => {
      const call: PendingCall = {
        n: this.made++,
        method,
        params,
        internal,
        refreshed: false,
        done: false,
        id: undefined,
        timeoutMs: options.timeoutMs,
        signal: options.signal,
        onAbort: undefined,
        timer: undefined,
        resolve,
        reject,
      };
      if (call.signal) {
        if (call.signal.aborted) {
          reject(call.signal.reason ?? new ClientClosedError("aborted"));
          return;
        }
        call.onAbort = () => this.giveUp(call, call.signal?.reason ?? new ClientClosedError("aborted"));
        call.signal.addEventListener("abort", call.onAbort, { once: true });
      }
      this.queue.push(call);
    });
  }

  /** Sends, in the order the calls were made, those `mayGo` allows, while
   * the in-flight window has room. */
  pump(write: (bytes: Uint8Array) => void, mayGo: (call: PendingCall) => boolean): void {
    for (let i = 0; i < this.queue.length && this.inflight.size + this.late.size < this.limit; ) {
      const call = this.queue[i]!;
      if (call.done) {
        this.queue.splice(i, 1);
      } else if (!mayGo(call)) {
        i++;
      } else {
        this.queue.splice(i, 1);
        this.send(write, call);
      }
    }
  }

  private send(write: (bytes: Uint8Array) => void, call: PendingCall): void {
    const id = this.nextId++;
    let bytes: Uint8Array;
    try {
      bytes = encodeFrame({ id, method: call.method, params: call.params });
    } catch (error) {
      this.settle(call, error, false);
      return;
    }
    call.id = id;
    this.inflight.set(id, call);
    call.timer = setTimeout(() => this.giveUp(call, new TimeoutError(call.method, call.timeoutMs)), call.timeoutMs);
    try {
      write(bytes);
    } catch {
      // The socket is closing; its close queues the call again or fails it.
    }
  }

  onWire(): Iterable<PendingCall> {
    return this.inflight.values();
  }

  /** The call a reply is for, taken off the wire; undefined for a reply to a
   * call given up on (its slot is free again) or to no call. */
  take(id: number): PendingCall | undefined {
    if (this.late.delete(id)) return undefined;
    const call = this.inflight.get(id);
    if (call !== undefined) {
      this.inflight.delete(id);
      clearTimeout(call.timer);
      call.id = undefined;
    }
    return call;
  }

  /** The socket is gone: every call it carried, taken off the wire. */
  takeAllOnWire(): PendingCall[] {
    const lost = [...this.inflight.values()];
    this.inflight.clear();
    this.late.clear();
    for (const call of lost) {
      clearTimeout(call.timer);
      call.id = undefined;
    }
    return lost;
  }

  /** Back in the queue, in its original place. */
  requeue(call: PendingCall): void {
    if (call.done) return;
    this.queue.push(call);
    this.queue.sort((a, b) => a.n - b.n);
  }

  queued(): readonly PendingCall[] {
    return this.queue;
  }

  get waiting(): number {
    return this.queue.filter((c) => !c.done).length;
  }

  settle(call: PendingCall, outcome: unknown, ok: boolean): void {
    if (call.done) return;
    call.done = true;
    clearTimeout(call.timer);
    if (call.signal && call.onAbort) call.signal.removeEventListener("abort", call.onAbort);
    if (ok) call.resolve(outcome);
    else call.reject(outcome);
  }

  /** Ends every call, queued or on the wire, with `error`. */
  failAll(error: unknown): void {
    for (const call of [...this.queue, ...this.inflight.values()]) this.settle(call, error, false);
    this.queue = [];
    this.inflight.clear();
    this.late.clear();
  }

  private giveUp(call: PendingCall, error: unknown): void {
    if (call.id !== undefined && this.inflight.delete(call.id)) this.late.add(call.id);
    this.settle(call, error, false);
  }
}
