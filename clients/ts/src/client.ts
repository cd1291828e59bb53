/**
 * The hangout client: one WebSocket, MessagePack frames, pipelined calls,
 * and a session that survives reconnects.
 *
 * - Calls are pipelined (up to `maxInFlight` on the wire; more wait their
 *   turn) and matched to replies by id. Each waits `timeoutMs` for its reply.
 * - While the socket is down, calls wait in a queue and go out once the
 *   session is restored, as Socket.IO buffers emits. Calls that need no
 *   sign-in (auth.login, auth.refresh, ...) go out as soon as the socket opens.
 * - The sends of one conversation go one at a time, so that its messages
 *   are stored in the order the app sent them.
 * - A call on the wire when the socket drops is sent again after the
 *   reconnect when repeating it is harmless: reads, the writes the protocol
 *   makes idempotent (bookings.create and wallet.topup by their key,
 *   bookings.cancel, users.update, chat.read) and chat.send, which always
 *   carries a client_msg_id (one is made when the app gives none) so that
 *   the server stores it once. Sign-in, refresh and logout are not repeated:
 *   they fail with ConnectionLostError.
 * - Reconnects use exponential backoff with full jitter; see session.ts for
 *   what happens once the socket is back.
 */
import { backoffDelay, type BackoffOptions } from "./backoff.js";
import { Calls, type PendingCall } from "./calls.js";
import type { ClientEvents, ConnectionState } from "./client-events.js";
import { decodeFrame } from "./codec.js";
import { Emitter, type EventMeta, type Listener } from "./emitter.js";
import { ClientClosedError, ConnectionLostError, RpcError } from "./errors.js";
import { bindApi, METHOD_AUTH, type Api, type Events, type MethodName, type Methods } from "./generated/api.js";
import { randomUuid } from "./ids.js";
import type { CallOptions, ClientOptions, WebSocketConstructor, WebSocketLike } from "./options.js";
import { Session } from "./session.js";

export const SUBPROTOCOL = "hangout.v1";

// Their effect must not happen twice, or they are the client's own business.
const NOT_REPEATABLE = new Set(["auth.register", "auth.login", "auth.refresh", "auth.logout", "auth.authenticate"]);

type AllEvents = Events & ClientEvents;

export interface HangoutClient extends Api {}

export class HangoutClient {
  private readonly options: ClientOptions;
  private readonly WebSocketClass: WebSocketConstructor;
  private readonly emitter = new Emitter<AllEvents>();
  private readonly session: Session;
  private ws: WebSocketLike | undefined;
  private open = false;
  private ready = false;
  private closed = false;
  private connectState: ConnectionState = "disconnected";
  private attempt = 0; // reconnects since the session was last ready
  private sockets = 0; // sockets opened, for choosing among several URLs
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private readonly calls: Calls;
  private readyWaiters: Array<{ resolve: () => void; reject: (error: unknown) => void }> = [];

  constructor(options: ClientOptions) {
    this.options = options;
    const WS = options.WebSocket ?? (globalThis as any).WebSocket;
    if (!WS) throw new TypeError("no WebSocket: pass options.WebSocket (in Node 20, the `ws` package's)");
    this.WebSocketClass = WS;
    this.calls = new Calls(options.maxInFlight ?? 32);
    const internal = (method: string, params: Record<string, unknown>) => this.enqueue(method, params, {}, true);
    this.session = new Session(internal, this.emitter, options.refreshToken, options);
    Object.assign(this, bindApi((method, params, callOptions) => this.call(method, params, callOptions)));
    if (options.autoConnect !== false) this.connect();
  }

  // ---- public surface -------------------------------------------------------

  get state(): ConnectionState {
    return this.connectState;
  }

  /** The signed-in user's id, once known. */
  get userId(): string | undefined {
    return this.session.userId;
  }

  /** Persist this to resume from after an app restart (`lastEventSeq`). */
  get lastEventSeq(): number {
    return this.session.lastEventSeq;
  }

  get joinedRooms(): string[] {
    return this.session.joinedRooms;
  }

  /** Calls a method by name (the typed functions, client.chat.send(...), call this). */
  call<M extends MethodName>(method: M, params: Methods[M]["params"], options?: CallOptions): Promise<Methods[M]["result"]>;
  call(method: string, params?: Record<string, unknown>, options?: CallOptions): Promise<any>;
  call(method: string, params: Record<string, unknown> = {}, options: CallOptions = {}): Promise<any> {
    if (method === "chat.send" && params.client_msg_id == null) params = { ...params, client_msg_id: this.newId() };
    return this.enqueue(method, params, options, false);
  }

  on<K extends keyof AllEvents>(name: K, listener: Listener<AllEvents[K]>): () => void {
    return this.emitter.on(name, listener);
  }

  once<K extends keyof AllEvents>(name: K, listener: Listener<AllEvents[K]>): () => void {
    return this.emitter.once(name, listener);
  }

  onAny(listener: (name: string, data: unknown, meta: EventMeta) => void): () => void {
    return this.emitter.onAny(listener);
  }

  /** Resolves once the socket is open and the session restored. */
  whenReady(): Promise<void> {
    if (this.ready) return Promise.resolve();
    if (this.closed) return Promise.reject(new ClientClosedError());
    return new Promise((resolve, reject) => this.readyWaiters.push({ resolve, reject }));
  }

  connect(): void {
    if (this.closed) throw new ClientClosedError();
    if (this.ws === undefined && this.reconnectTimer === undefined) this.openSocket();
  }

  /** Closes the socket for good; every call not yet answered fails with ClientClosedError. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    this.session.dispose();
    const ws = this.ws;
    this.ws = undefined;
    this.open = this.ready = false;
    const error = new ClientClosedError();
    this.calls.failAll(error);
    for (const waiter of this.readyWaiters.splice(0)) waiter.reject(error);
    this.setState("closed");
    if (ws) ws.close(1000);
  }

  // ---- the socket -------------------------------------------------------------

  private urlFor(n: number): string {
    const url = this.options.url;
    if (typeof url === "function") return url(n);
    if (Array.isArray(url)) return url[n % url.length]!;
    return url;
  }

  private openSocket(): void {
    this.setState("connecting");
    let ws: WebSocketLike;
    try {
      ws = new this.WebSocketClass(this.urlFor(this.sockets++), [SUBPROTOCOL]);
    } catch (error) {
      this.emitter.emit("error", error as Error);
      this.scheduleReconnect(undefined);
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.open = true;
      void this.restore(ws);
    };
    ws.onmessage = (ev) => {
      if (this.ws === ws) this.onData(ev.data);
    };
    ws.onerror = () => {
      // A close event follows; it decides what happens next.
    };
    ws.onclose = (ev) => {
      if (this.ws === ws) this.onClosed(ev.code);
    };
  }

  private async restore(ws: WebSocketLike): Promise<void> {
    this.setState("restoring");
    this.pump(); // calls that need no sign-in may go at once
    try {
      await this.session.restore();
    } catch (error) {
      if (this.ws !== ws) return; // dropped meanwhile: the next socket restores again
      // The server could not serve the restore (unavailable, rate_limited):
      // going on would leave a gap, so try again on a new socket, after a backoff.
      this.emitter.emit("error", error as Error);
      ws.onclose = null;
      ws.close(4000, "restore failed");
      this.onClosed(4000);
      return;
    }
    if (this.ws !== ws || this.closed) return;
    this.ready = true;
    this.attempt = 0;
    this.setState("ready");
    for (const waiter of this.readyWaiters.splice(0)) waiter.resolve();
    this.pump();
  }

  private onClosed(code: number | undefined): void {
    this.ws = undefined;
    this.open = this.ready = false;
    for (const call of this.calls.takeAllOnWire()) {
      if (call.internal || NOT_REPEATABLE.has(call.method)) this.calls.settle(call, new ConnectionLostError(call.method), false);
      else this.calls.requeue(call);
    }
    // The client's own calls belong to the socket that is gone.
    for (const call of this.calls.queued()) {
      if (call.internal) this.calls.settle(call, new ConnectionLostError(call.method), false);
    }
    if (this.closed) return;
    this.setState("disconnected");
    this.scheduleReconnect(code);
  }

  private scheduleReconnect(code: number | undefined): void {
    const reconnect = this.options.reconnect;
    if (reconnect === false || this.closed) return;
    // Signed out with nothing to send (a sign-in screen left open, which the
    // server closes after its sign-in deadline): the next call reconnects.
    if (this.session.accessToken === undefined && this.calls.waiting === 0) return;
    const delayMs = backoffDelay(this.attempt, reconnect as BackoffOptions | undefined);
    this.emitter.emit("reconnecting", { attempt: this.attempt, delayMs, code });
    this.attempt += 1;
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      if (!this.closed) this.openSocket();
    }, delayMs);
  }

  private setState(state: ConnectionState): void {
    if (this.connectState === state) return;
    this.connectState = state;
    this.emitter.emit("state", { state });
  }

  // ---- calls --------------------------------------------------------------------

  private newId(): string {
    return (this.options.newId ?? randomUuid)();
  }

  private enqueue(method: string, params: Record<string, unknown>, options: CallOptions, internal: boolean): Promise<any> {
    if (this.closed) return Promise.reject(new ClientClosedError());
    if (internal && !this.open) return Promise.reject(new ConnectionLostError(method));
    const timeoutMs = options.timeoutMs ?? this.options.callTimeoutMs ?? 10_000;
    const reply = this.calls.add(method, params, { ...options, timeoutMs }, internal);
    if (this.ws === undefined && this.reconnectTimer === undefined && this.options.reconnect !== false) this.openSocket();
    else this.pump();
    return reply;
  }

  /** Sends what may go now: before the session is restored, only the
   * client's own calls and those that need no sign-in. */
  private pump(): void {
    const ws = this.ws;
    if (!this.open || ws === undefined) return;
    this.calls.pump(
      (bytes) => ws.send(bytes),
      (call) => (this.ready || call.internal || METHOD_AUTH[call.method as MethodName] === false) && !this.sendWaits(call),
    );
  }

  /** The server may run pipelined calls in any order, so a conversation's
   * sends go one at a time: messages keep the order they were written in. */
  private sendWaits(call: PendingCall): boolean {
    if (call.method !== "chat.send") return false;
    const conversation = call.params.conversation_id;
    for (const other of this.calls.onWire()) {
      if (other.method === "chat.send" && other.params.conversation_id === conversation) return true;
    }
    return false;
  }

  // ---- frames from the server ---------------------------------------------------

  private onData(data: unknown): void {
    let frame: any;
    try {
      frame = decodeFrame(data as ArrayBuffer);
    } catch (error) {
      this.emitter.emit("error", error as Error);
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    if (typeof frame.event === "string") {
      this.session.onEvent(frame.event, frame.data ?? {}, typeof frame.seq === "number" ? frame.seq : undefined);
      return;
    }
    const id = frame.id;
    if (typeof id !== "number") {
      const e = frame.error;
      this.emitter.emit("error", new RpcError("(unknown)", e?.code ?? "bad_frame", e?.message ?? "reply without an id"));
      return;
    }
    const call = this.calls.take(id);
    if (call !== undefined) {
      if (frame.error !== undefined) this.failed(call, frame.error);
      else this.succeeded(call, frame.result);
    }
    this.pump();
  }

  private succeeded(call: PendingCall, result: any): void {
    if (!call.internal) {
      try {
        this.session.observe(call.method, call.params, result);
      } catch (error) {
        this.emitter.emit("error", error as Error);
      }
    }
    this.calls.settle(call, result, true);
  }

  private failed(call: PendingCall, wire: any): void {
    const error = new RpcError(call.method, String(wire?.code), String(wire?.message ?? ""), wire?.data ?? undefined);
    // An expired token: get a fresh one from the app and try once more.
    if (error.code === "token_expired" && !call.internal && !call.refreshed && this.session.canRefresh) {
      call.refreshed = true;
      this.session.refresh().then(
        (ok) => {
          if (!ok) this.calls.settle(call, error, false);
          else if (this.closed) this.calls.settle(call, new ClientClosedError(), false);
          else {
            this.calls.requeue(call);
            this.pump();
          }
        },
        () => this.calls.settle(call, error, false),
      );
      return;
    }
    this.calls.settle(call, error, false);
  }
}
