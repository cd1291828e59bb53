/**
 * What outlives a socket: the access token, the user, the user events and
 * chat messages already given to the app, and the rooms it joined. After a
 * reconnect the session signs in again, resumes the user's events from the
 * last seq and re-joins each room from its last seq, handing the app only
 * what it has not had (by seq), so that nothing is missed or seen twice.
 */
import type { Emitter } from "./emitter.js";
import { RpcError } from "./errors.js";
import type { Events, Methods } from "./generated/api.js";
import { SeqTracker } from "./seqs.js";
import type { Timestamp } from "./timestamp.js";
import type { ClientEvents } from "./client-events.js";

type OwnUser = Methods["users.me"]["result"];
type JoinResult = Methods["chat.join"]["result"];
type ResumeResult = Methods["events.resume"]["result"];

/** How the session calls the server: the client's own calls, sent before the
 * app's and never repeated on another socket. */
export type InternalCall = (method: string, params: Record<string, unknown>) => Promise<any>;

// A user's events per events.resume reply is at most 500; this bounds the
// pages one resume reads (a user with millions of unread events re-reads state).
const MAX_RESUME_PAGES = 1000;
// Ahead of expiry, a token is refreshed at most this early (the server warns 60 s before).
const REFRESH_LEAD_MS = 60_000;

export class Session {
  accessToken: string | undefined;
  userId: string | undefined;
  private events: SeqTracker;
  private firstSeq: number | undefined;
  private readonly rooms = new Map<string, SeqTracker>();
  private boundAt = 0;
  private refreshing: Promise<boolean> | undefined;
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    private readonly call: InternalCall,
    private readonly emitter: Emitter<Events & ClientEvents>,
    private readonly refreshToken: (() => Promise<string | null>) | undefined,
    options: { accessToken?: string; lastEventSeq?: number },
  ) {
    this.accessToken = options.accessToken;
    this.firstSeq = options.lastEventSeq;
    this.events = new SeqTracker(options.lastEventSeq ?? 0);
  }

  /** The last user event seq up to which the app has had everything: what
   * an app persists to resume from after a restart (`lastEventSeq`). */
  get lastEventSeq(): number {
    return this.events.floor;
  }

  get joinedRooms(): string[] {
    return [...this.rooms.keys()];
  }

  get canRefresh(): boolean {
    return this.refreshToken !== undefined;
  }

  // ---- after a socket opens ---------------------------------------------

  /** Sign in again, resume, re-join. Throws if the socket drops meanwhile. */
  async restore(): Promise<void> {
    if (this.accessToken === undefined) return;
    if (!(await this.signIn())) return;
    await this.resume();
    await this.rejoin();
  }

  private async signIn(): Promise<boolean> {
    const token = this.accessToken!;
    try {
      const result = await this.call("auth.authenticate", { access_token: token });
      this.bound(token, result.user);
      return true;
    } catch (error) {
      if (!(error instanceof RpcError)) throw error;
      if (error.code === "token_expired" && this.canRefresh && (await this.refreshedOrRefused())) return true;
      if (error.code === "token_expired" || error.code === "unauthenticated") {
        this.signedOut(error.code);
        return false;
      }
      throw error;
    }
  }

  /** A refresh, where a refresh token the server refuses (revoked, reused,
   * past the session's end) counts as no token: the session is over rather
   * than retried on every reconnect. */
  private async refreshedOrRefused(): Promise<boolean> {
    try {
      return await this.refresh();
    } catch (error) {
      if (error instanceof RpcError && (error.code === "invalid_credentials" || error.code === "unauthenticated")) {
        this.emitter.emit("error", error);
        return false;
      }
      throw error;
    }
  }

  /** The user's events after the last one the app had, page by page. */
  async resume(): Promise<void> {
    for (let page = 0; page < MAX_RESUME_PAGES; page++) {
      const since = this.events.floor;
      const result: ResumeResult = await this.call("events.resume", { since_seq: since });
      for (const stored of result.events) this.deliverNumbered(stored.event, stored.data, stored.seq, true);
      if (result.truncated) this.emitter.emit("truncated", { since_seq: since, last_seq: result.last_seq });
      const last = result.events.at(-1)?.seq;
      if (!result.has_more || last === undefined) {
        this.events.raiseFloor(result.last_seq);
        return;
      }
      this.events.raiseFloor(last);
    }
  }

  private async rejoin(): Promise<void> {
    await Promise.all(
      [...this.rooms].map(async ([conversationId, seen]) => {
        let result: JoinResult;
        try {
          result = await this.call("chat.join", { conversation_id: conversationId, since_seq: seen.floor });
        } catch (error) {
          // No longer a party (or the room is gone): the app hears of it once.
          if (error instanceof RpcError && (error.code === "not_found" || error.code === "forbidden")) {
            this.rooms.delete(conversationId);
            this.emitter.emit("roomLeft", { conversation_id: conversationId, code: error.code });
            return;
          }
          throw error;
        }
        this.roomReply(conversationId, result, true);
      }),
    );
  }

  // ---- what the app's own calls change ------------------------------------

  observe(method: string, params: Record<string, any>, result: any): void {
    switch (method) {
      case "auth.login":
      case "auth.register":
        this.bound(result.access_token, result.user);
        this.catchUp(result.user);
        break;
      case "auth.authenticate":
        this.bound(params.access_token, result.user);
        this.catchUp(result.user);
        break;
      case "auth.logout":
        this.signedOut("logout");
        break;
      case "chat.join":
        this.roomReply(params.conversation_id, result, false);
        break;
      case "chat.leave":
        this.rooms.delete(params.conversation_id);
        break;
      case "events.resume":
        for (const stored of (result as ResumeResult).events) this.events.accept(stored.seq);
        break;
    }
  }

  private bound(token: string, user: OwnUser): void {
    this.accessToken = token;
    this.boundAt = Date.now();
    if (this.userId !== user.id) {
      if (this.userId !== undefined) {
        // Another user on this client: nothing of the previous one carries over.
        this.events = new SeqTracker(user.event_seq);
      } else if (this.firstSeq === undefined) {
        this.events.raiseFloor(user.event_seq);
      }
      this.rooms.clear();
      this.userId = user.id;
    }
    this.emitter.emit("authenticated", { user });
  }

  /** After the app signs in itself: the events since `lastEventSeq`, if it gave one. */
  private catchUp(user: OwnUser): void {
    if (this.events.floor < user.event_seq) this.resume().catch((error) => this.emitter.emit("error", error));
  }

  private signedOut(reason: string): void {
    this.accessToken = undefined;
    this.rooms.clear();
    clearTimeout(this.refreshTimer);
    this.emitter.emit("signedOut", { reason });
  }

  private roomReply(conversationId: string, result: JoinResult, replayed: boolean): void {
    let seen = this.rooms.get(conversationId);
    if (!seen) this.rooms.set(conversationId, (seen = new SeqTracker()));
    for (const message of result.messages) {
      // The app's own join hands it the messages as its result; a re-join
      // hands the missed ones over as chat.message events.
      if (seen.accept(message.seq) && replayed) this.emitter.emit("chat.message", { message }, { replayed: true });
    }
    if (result.truncated && replayed) this.emitter.emit("roomTruncated", { conversation_id: conversationId });
    seen.raiseFloor(result.last_seq);
  }

  // ---- events as they arrive ----------------------------------------------

  onEvent(name: string, data: any, seq: number | undefined): void {
    if (seq !== undefined) {
      this.deliverNumbered(name, data, seq, false);
      return;
    }
    if (name === "chat.message") {
      const message = data?.message;
      const seen = this.rooms.get(message?.conversation_id);
      if (seen && !seen.accept(message.seq)) return;
    } else if (name === "auth.expiring") {
      this.scheduleRefresh(data?.expires_at);
    }
    this.emitter.emit(name as keyof Events, data, {});
  }

  private deliverNumbered(name: string, data: any, seq: number, replayed: boolean): void {
    if (this.events.accept(seq)) this.emitter.emit(name as keyof Events, data, { seq, replayed });
  }

  // ---- token refresh --------------------------------------------------------

  /**
   * Refresh when the server warns, but never sooner than halfway through the
   * token's life: with short-lived tokens (shorter than the server's 60 s
   * warning) every new token is "expiring" at once, and refreshing at once
   * would loop.
   */
  private scheduleRefresh(expiresAt: Timestamp | undefined): void {
    if (!this.canRefresh || expiresAt === undefined || typeof (expiresAt as any).toDate !== "function") return;
    const expires = expiresAt.toDate().getTime();
    const lead = Math.min(REFRESH_LEAD_MS, Math.max(0, (expires - this.boundAt) / 2));
    clearTimeout(this.refreshTimer);
    this.refreshTimer = setTimeout(() => {
      this.refresh().catch((error) => this.emitter.emit("error", error));
    }, Math.max(0, expires - lead - Date.now()));
  }

  /** Gets a fresh token from the app and binds the socket to it; calls made
   * meanwhile share the one refresh. */
  refresh(): Promise<boolean> {
    this.refreshing ??= (async () => {
      try {
        const token = await this.refreshToken!();
        if (!token) return false;
        const result = await this.call("auth.authenticate", { access_token: token });
        this.bound(token, result.user);
        return true;
      } finally {
        this.refreshing = undefined;
      }
    })();
    return this.refreshing;
  }

  dispose(): void {
    clearTimeout(this.refreshTimer);
  }
}
