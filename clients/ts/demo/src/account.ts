/** The wallet, KYC status, the host's price, and the bookings list, all
 * kept current by the user events (wallet.updated, user.updated,
 * booking.*), which the SDK hands over once each, also after a reconnect. */
import type { Booking, OwnUser } from "@hangout/client";
import type { Demo } from "./context.js";
import { byId, el, field, notice, onSubmit, showError, when } from "./dom.js";

/** What the bookings list needs of the chat: its button opens one, and its
 * unread badges are the chat's to fill. */
export interface ChatLink {
  open(booking: Booking): Promise<void>;
  follow(conversationId: string): Promise<void>;
  refreshBadges(): void;
}

export class Account {
  private readonly bookings = new Map<string, Booking>();

  constructor(private readonly demo: Demo, private readonly chat: ChatLink) {
    const { client } = demo;
    client.on("user.updated", ({ user }) => this.showUser(user));
    client.on("wallet.updated", ({ balance }) => this.showBalance(balance));
    for (const name of ["booking.created", "booking.cancelled", "booking.completed"] as const) {
      client.on(name, ({ booking }) => this.upsert(booking));
    }
    onSubmit(byId<HTMLFormElement>("topup"), async (form) => {
      const result = await client.wallet.topup({ amount: field(form, "amount"), idempotency_key: crypto.randomUUID() });
      this.showBalance(result.balance);
    });
    onSubmit(byId<HTMLFormElement>("offer"), async (form) => {
      // An empty price takes the user off the search (null = not bookable).
      const price = field(form, "price");
      this.showUser(await client.users.update({ price_per_hour: price === "" ? null : price }));
    });
  }

  /** After sign-in: the user as they are, and their bookings. */
  async load(user: OwnUser): Promise<void> {
    this.showUser(user);
    this.bookings.clear();
    const { bookings } = await this.demo.client.bookings.list({ role: "any", limit: 50 });
    for (const booking of bookings) this.upsert(booking);
    this.render();
  }

  showUser(user: OwnUser): void {
    this.demo.me = user;
    byId("me").textContent = `${user.name} <${user.email}>`;
    byId("me").hidden = false;
    byId("kyc").textContent = user.kyc_status;
    byId("kyc").dataset.status = user.kyc_status;
    byId("offering").textContent = user.price_per_hour ? `offering at ${user.price_per_hour}/h` : "not offering";
    this.showBalance(user.balance);
  }

  private showBalance(balance: string): void {
    byId("balance").textContent = balance;
  }

  upsert(booking: Booking): void {
    const known = this.bookings.get(booking.id);
    // Events may arrive out of order: the newer state of a booking wins.
    if (known && known.updated_at.compare(booking.updated_at) > 0) return;
    this.bookings.set(booking.id, booking);
    if (booking.conversation_id && booking.status === "confirmed") void this.chat.follow(booking.conversation_id);
    this.render();
  }

  private render(): void {
    const list = byId("bookings");
    const sorted = [...this.bookings.values()].sort((a, b) => b.start_at.compare(a.start_at));
    list.replaceChildren(...sorted.map((b) => this.item(b)));
    if (sorted.length === 0) list.append(el("li", { class: "muted" }, "No bookings yet."));
    this.chat.refreshBadges();
  }

  private item(booking: Booking): HTMLLIElement {
    const mine = booking.user_id === this.demo.me?.id;
    const who = el("b");
    void this.demo.name(mine ? booking.host_id : booking.user_id).then((name) => (who.textContent = name));
    const li = el(
      "li",
      { "data-booking-id": booking.id, "data-status": booking.status },
      el("span", {}, mine ? "with " : "hosting ", who, ` · ${when(booking.start_at)} · ${booking.amount}`),
      el("span", { class: "status" }, booking.status),
    );
    if (booking.conversation_id) {
      const chat = el("button", { type: "button", class: "open-chat" }, "Chat ");
      chat.append(el("span", { class: "badge", "data-unread": booking.conversation_id, hidden: "" }));
      chat.addEventListener("click", () => this.chat.open(booking).catch(showError));
      li.append(chat);
    }
    if (booking.status === "confirmed" && booking.start_at.toDate().getTime() > Date.now()) {
      const cancel = el("button", { type: "button", class: "cancel" }, "Cancel");
      cancel.addEventListener("click", () => {
        this.demo.client.bookings.cancel({ booking_id: booking.id }).then((r) => {
          this.upsert(r.booking);
          notice("Cancelled; the money is back in the booker's wallet.");
        }, showError);
      });
      li.append(cancel);
    }
    return li;
  }
}
