/** Searching hosts free for a time range, and booking one. */
import { Timestamp, type PublicUser } from "@hangout/client";
import type { Account } from "./account.js";
import type { Demo } from "./context.js";
import { byId, el, field, notice, onSubmit, showError } from "./dom.js";

const HOUR_MS = 3_600_000;

/** A datetime-local value (local time, to the minute). */
function localInput(date: Date): string {
  const two = (n: number) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${two(date.getMonth() + 1)}-${two(date.getDate())}T${two(date.getHours())}:${two(date.getMinutes())}`;
}

export class Hosts {
  constructor(private readonly demo: Demo, private readonly account: Account) {
    const form = byId<HTMLFormElement>("search-form");
    // Tomorrow, at the next whole hour.
    form.querySelector<HTMLInputElement>("[name=start]")!.value = localInput(new Date((Math.floor(Date.now() / HOUR_MS) + 25) * HOUR_MS));
    onSubmit(form, (f) => this.search(f));
  }

  private async search(form: HTMLFormElement): Promise<void> {
    // Bookings are whole UTC hours: a time zone with a half-hour offset
    // gets the UTC hour that the chosen time falls in.
    const chosen = new Date(field(form, "start")).getTime();
    if (Number.isNaN(chosen)) throw new Error("Pick a start time.");
    const start = Timestamp.fromDate(new Date(Math.floor(chosen / HOUR_MS) * HOUR_MS));
    const end = start.plus(Number(field(form, "hours")) * 3600);
    byId("search-range").textContent = `${start.toISOString()} – ${end.toISOString()} (UTC)`;
    const { hosts } = await this.demo.client.hosts.search({
      start_at: start,
      end_at: end,
      min_price: field(form, "min_price") || null,
      max_price: field(form, "max_price") || null,
      limit: 20,
    });
    const list = byId("hosts");
    list.replaceChildren(...hosts.map((host) => this.item(host, start, end)));
    if (hosts.length === 0) list.append(el("li", { class: "muted" }, "Nobody is free then."));
  }

  private item(host: PublicUser, start: Timestamp, end: Timestamp): HTMLLIElement {
    const book = el("button", { type: "button", class: "book" }, "Book");
    const li = el("li", { "data-host-id": host.id }, el("span", {}, `${host.name} (${host.gender})`), el("span", {}, `${host.price_per_hour}/h`), book);
    book.addEventListener("click", () => {
      book.disabled = true;
      // One key per click: a retry of this click after a lost reply books once.
      const key = crypto.randomUUID();
      this.demo.client.bookings.create({ host_id: host.id, start_at: start, end_at: end, idempotency_key: key }).then(
        ({ booking }) => {
          this.account.upsert(booking);
          li.remove();
          notice(`Booked ${host.name} for ${booking.amount}.`);
        },
        (error) => {
          book.disabled = false;
          showError(error);
        },
      );
    });
    return li;
  }
}
