/**
 * One open conversation: live messages, read receipts, typing and presence.
 *
 * Read receipts and presence are the protocol's second edition. A server
 * without them sends no `read_seq`/`presence` fields and no `chat.read` /
 * `chat.presence` events, whatever the SDK's types say: the page then shows
 * neither (no "read" marks, no online pill) rather than guessing.
 */
import type { Booking, ChatPresenceEvent, ChatReadEvent, Message, Presence } from "@hangout/client";
import type { Demo } from "./context.js";
import { byId, el, field, onSubmit, showError, when } from "./dom.js";

const TYPING_SHOWN_MS = 4000;
const TYPING_SENT_EVERY_MS = 3000;

export class Chat {
  private id: string | undefined;
  private peer = "";
  private readonly messages = new Map<number, Message>();
  private readSeq = 0;
  // Undefined: the server does not report read positions.
  private otherReadSeq: number | undefined;
  private readonly unread = new Map<string, number>();
  private readonly following = new Set<string>();
  private typingTimer: ReturnType<typeof setTimeout> | undefined;
  private typingSentAt = 0;

  constructor(private readonly demo: Demo) {
    const { client } = demo;
    client.on("chat.message", ({ message }) => this.received(message));
    client.on("chat.typing", ({ conversation_id, user_id }) => {
      if (conversation_id === this.id && user_id === this.peer) this.showTyping();
    });
    client.on("chat.read", (data) => this.readEvent(data));
    client.on("chat.presence", (data) => {
      if (data.conversation_id === this.id && data.user_id === this.peer) this.showPresence(data);
    });
    onSubmit(byId<HTMLFormElement>("chat-form"), async (form) => {
      const content = field(form, "content");
      const { message } = await client.chat.send({ conversation_id: this.id!, content });
      form.reset();
      this.add(message);
    });
    byId("chat-form").addEventListener("input", () => this.typed());
    document.addEventListener("visibilitychange", () => this.markRead());
  }

  /** After sign-in: the unread counts (2nd ed.: `unread`), and every
   * conversation followed, since chat.message only reaches sockets joined
   * to it: the badges then count messages as they arrive. */
  async loadConversations(): Promise<void> {
    const { conversations } = await this.demo.client.chat.conversations({ limit: 100 });
    for (const c of conversations) {
      if (c.unread !== undefined) this.setUnread(c.id, c.unread);
    }
    await Promise.all(conversations.map((c) => this.follow(c.id)));
  }

  /** Joins a conversation once, for its live messages (the SDK re-joins it
   * after a reconnect, handing over what was missed). */
  async follow(conversationId: string): Promise<void> {
    if (this.following.has(conversationId)) return;
    this.following.add(conversationId);
    await this.demo.client.chat.join({ conversation_id: conversationId }).catch((error) => {
      this.following.delete(conversationId);
      showError(error);
    });
  }

  async open(booking: Booking): Promise<void> {
    const id = booking.conversation_id!;
    if (this.id === id) return;
    this.id = id;
    this.following.add(id);
    this.peer = booking.user_id === this.demo.me?.id ? booking.host_id : booking.user_id;
    this.messages.clear();
    this.readSeq = 0;
    this.otherReadSeq = undefined;
    let result;
    try {
      // Joined again for the latest messages, read positions and presence.
      result = await this.demo.client.chat.join({ conversation_id: id });
    } catch (error) {
      if (this.id === id) this.id = undefined; // so that another click tries again
      throw error;
    }
    if (this.id !== id) return; // another chat was opened meanwhile
    this.readSeq = Math.max(this.readSeq, result.conversation.read_seq ?? 0);
    // A chat.read event may have come during the join: positions only move forward.
    const other: number | undefined = result.conversation.other_read_seq;
    if (other !== undefined) this.otherReadSeq = Math.max(this.otherReadSeq ?? 0, other);
    const section = byId("chat");
    section.hidden = false;
    section.dataset.conversationId = id;
    byId("chat-peer").textContent = await this.demo.name(this.peer);
    if (result.presence) this.showPresence(result.presence);
    else byId("presence").hidden = true;
    for (const message of result.messages) this.messages.set(message.seq, message);
    this.render();
    this.markRead();
    byId<HTMLInputElement>("chat-form").querySelector("input")!.focus();
  }

  close(): void {
    this.id = undefined;
    this.following.clear();
    byId("chat").hidden = true;
  }

  private received(message: Message): void {
    if (message.conversation_id === this.id) {
      this.add(message);
      if (message.sender_id === this.peer) byId("typing").hidden = true;
      this.markRead();
    } else if (message.sender_id !== this.demo.me?.id) {
      this.setUnread(message.conversation_id, (this.unread.get(message.conversation_id) ?? 0) + 1);
    }
  }

  /** Each seq once: a message may come as the send's reply and as an event. */
  private add(message: Message): void {
    if (this.messages.has(message.seq)) return;
    this.messages.set(message.seq, message);
    this.render();
  }

  private render(): void {
    const list = byId("messages");
    const sorted = [...this.messages.values()].sort((a, b) => a.seq - b.seq);
    list.replaceChildren(...sorted.map((m) => this.item(m)));
    list.scrollTop = list.scrollHeight;
  }

  private item(message: Message): HTMLLIElement {
    const mine = message.sender_id === this.demo.me?.id;
    let meta = when(message.created_at);
    if (mine && this.otherReadSeq !== undefined) meta += message.seq <= this.otherReadSeq ? " · read" : " · sent";
    return el("li", { class: mine ? "mine" : "theirs", "data-seq": String(message.seq) }, message.content, el("span", { class: "meta" }, meta));
  }

  /** Tells the server (and so the other party) what this user has seen:
   * only while the page is visible, and only forward. */
  private markRead(): void {
    const id = this.id;
    const last = Math.max(0, ...this.messages.keys());
    if (!id || document.visibilityState !== "visible" || last <= this.readSeq) return;
    this.readSeq = last;
    this.setUnread(id, 0);
    this.demo.client.chat.read({ conversation_id: id, seq: last }).then(
      (r) => (this.readSeq = Math.max(this.readSeq, r.read_seq)),
      (error: unknown) => {
        // A server of the first edition has no chat.read: nothing to show.
        if ((error as { code?: string }).code !== "unknown_method") showError(error);
      },
    );
  }

  private readEvent(data: ChatReadEvent): void {
    if (data.user_id === this.demo.me?.id) {
      // Read on another device of this user: the badge clears here too.
      if (data.conversation_id !== this.id) this.setUnread(data.conversation_id, 0);
      return;
    }
    if (data.conversation_id !== this.id) return;
    this.otherReadSeq = Math.max(this.otherReadSeq ?? 0, data.read_seq);
    this.render();
  }

  private showPresence(presence: Presence | ChatPresenceEvent): void {
    const pill = byId("presence");
    pill.hidden = false;
    pill.dataset.online = String(presence.online);
    pill.textContent = presence.online
      ? "online"
      : presence.last_seen_at
        ? `last seen ${when(presence.last_seen_at)}`
        : "offline";
  }

  private showTyping(): void {
    const line = byId("typing");
    line.textContent = "typing…";
    line.hidden = false;
    clearTimeout(this.typingTimer);
    this.typingTimer = setTimeout(() => (line.hidden = true), TYPING_SHOWN_MS);
  }

  private typed(): void {
    if (!this.id || Date.now() - this.typingSentAt < TYPING_SENT_EVERY_MS) return;
    this.typingSentAt = Date.now();
    this.demo.client.chat.typing({ conversation_id: this.id }).catch(() => undefined);
  }

  private setUnread(conversationId: string, count: number): void {
    this.unread.set(conversationId, count);
    for (const badge of document.querySelectorAll<HTMLElement>(`[data-unread="${conversationId}"]`)) {
      badge.textContent = String(count);
      badge.hidden = count === 0;
    }
  }

  /** The bookings list was drawn again: its badges show the counts. */
  refreshBadges(): void {
    for (const [id, count] of this.unread) this.setUnread(id, count);
  }
}
