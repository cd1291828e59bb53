/** Users, hosts and bookings for the tests, made through the SDK itself. */
import { randomUUID } from "node:crypto";
import WebSocket from "ws";
import { HangoutClient, Timestamp, type ClientOptions, type Events, type EventMeta } from "../../src/index.js";
import type { ServerProcess } from "./server.js";

export const PASSWORD = "correct horse battery";

export function newEmail(): string {
  return `ts${randomUUID().replace(/-/g, "").slice(0, 16)}@example.test`;
}

export function client(url: string | string[], options: Partial<ClientOptions> = {}): HangoutClient {
  return new HangoutClient({ url, WebSocket: WebSocket as any, reconnect: { baseMs: 100, capMs: 2000 }, ...options });
}

export interface Person {
  client: HangoutClient;
  id: string;
  email: string;
  refreshToken: string;
}

export async function signUp(c: HangoutClient, name = "Ts User"): Promise<Person> {
  const email = newEmail();
  const session = await c.auth.register({ email, password: PASSWORD, name, gender: "female" });
  return { client: c, id: session.user.id, email, refreshToken: session.refresh_token };
}

/** Resolves with the next event `name` that `match` accepts (bounded by `timeoutMs`). */
export function nextEvent<K extends keyof Events>(
  c: HangoutClient,
  name: K,
  match: (data: Events[K], meta: EventMeta) => boolean = () => true,
  timeoutMs = 10_000,
): Promise<Events[K]> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${String(name)} within ${timeoutMs} ms`));
    }, timeoutMs);
    const off = c.on(name, (data: any, meta) => {
      if (!match(data, meta)) return;
      clearTimeout(timer);
      off();
      resolve(data);
    });
  });
}

/** A signed-up user whom KYC verified. */
export async function verified(server: ServerProcess, c: HangoutClient, name = "Ts User"): Promise<Person> {
  const person = await signUp(c, name);
  const updated = nextEvent(c, "user.updated", (d) => d.user.kyc_status === "verified");
  if ((await server.kyc(person.id, "verified")) !== 200) throw new Error("kyc webhook refused");
  await updated;
  return person;
}

export async function host(server: ServerProcess, c: HangoutClient, price = "50.00"): Promise<Person> {
  const person = await verified(server, c, "Ts Host");
  await c.users.update({ price_per_hour: price });
  return person;
}

export async function booker(server: ServerProcess, c: HangoutClient, balance = "1000.00"): Promise<Person> {
  const person = await verified(server, c, "Ts Booker");
  await c.wallet.topup({ amount: balance, idempotency_key: randomUUID() });
  return person;
}

/** A whole UTC hour `days` days and `hours` hours after the current hour. */
export function slot(days = 1, hours = 0): Timestamp {
  const hour = Math.floor(Date.now() / 3_600_000) * 3600;
  return new Timestamp(hour + days * 86_400 + hours * 3600);
}

export function key(): string {
  return randomUUID();
}

/** A bounded poll of a read a replica serves: another user's writes reach
 * it a little later, and there is nothing to await. */
export async function eventually(check: () => Promise<boolean>, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`never saw ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
