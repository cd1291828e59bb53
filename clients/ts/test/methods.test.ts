/**
 * Every method of the contract through the SDK's typed functions, against
 * two real server processes (a booker on one, a host on the other), and the
 * value encodings: microseconds survive both ways, money stays a string.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { METHOD_AUTH, RpcError, Timestamp, type HangoutClient, type TimeInput } from "../src/index.js";
import { booker, client, eventually, host, key, nextEvent, PASSWORD, signUp, slot } from "./support/people.js";
import { ServerProcess } from "./support/server.js";

const server1 = new ServerProcess();
const server2 = new ServerProcess();
const clients: HangoutClient[] = [];
const called = new Set<string>();

/** A client whose calls are counted toward "every method". */
function counted(url: string, options = {}): HangoutClient {
  const c = client(url, options);
  const call = c.call.bind(c) as (method: string, params?: any, options?: any) => Promise<any>;
  (c as any).call = (method: string, params?: any, options?: any) => {
    called.add(method);
    return call(method, params, options);
  };
  clients.push(c);
  return c;
}

before(async () => {
  await Promise.all([server1.start(), server2.start()]);
});

after(async () => {
  for (const c of clients) c.close();
  await Promise.all([server1.stop(), server2.stop()]);
});

test("every method answers through the typed functions, across two processes", async () => {
  const b = await booker(server1, counted(server1.url));
  const h = await host(server2, counted(server2.url));
  const bc = b.client;
  const hc = h.client;

  // auth: login and logout on one fresh socket; authenticate and refresh on another.
  const other = counted(server2.url);
  const first = await other.auth.login({ email: b.email, password: PASSWORD });
  assert.equal(first.user.id, b.id);
  assert.equal(typeof first.user.balance, "string");
  assert.deepEqual(await other.auth.logout(), {});
  await assert.rejects(other.users.me(), (e: unknown) => e instanceof RpcError && e.code === "unauthenticated");
  const login = await other.auth.login({ email: b.email, password: PASSWORD });
  const third = counted(server1.url);
  assert.equal((await third.auth.authenticate({ access_token: login.access_token })).user.id, b.id);
  const rotated = await third.auth.refresh({ refresh_token: login.refresh_token });
  assert.notEqual(rotated.refresh_token, login.refresh_token);
  await assert.rejects(third.auth.refresh({ refresh_token: login.refresh_token }), (e: unknown) =>
    e instanceof RpcError && e.code === "invalid_credentials");

  // users and hosts.
  const me = await bc.users.me();
  assert.equal(me.balance, "1000.00");
  assert.equal((await bc.users.update({ name: "Renamed Booker" })).name, "Renamed Booker");
  // Another user's writes reach the replica a little later ("other users
  // may see it a little later"): these reads are retried until they do.
  await eventually(async () => (await bc.users.get({ user_id: h.id })).price_per_hour === "50.00", "the host's price");
  const start = slot(2);
  const end = start.plus(3600);
  await eventually(async () => {
    let cursor: string | null | undefined;
    for (let page = 0; page < 1000; page++) {
      const r = await bc.hosts.search({ start_at: start, end_at: end, min_price: "50.00", max_price: "50.00", cursor, limit: 100 });
      if (r.hosts.some((u) => u.id === h.id)) return true;
      cursor = r.next_cursor;
      if (cursor === null) return false;
    }
    return false;
  }, "the new host found free for the slot");

  // wallet.
  const topup = await bc.wallet.topup({ amount: "25.50", idempotency_key: key() });
  assert.equal(topup.balance, "1025.50");
  assert.equal(topup.transaction.amount, "25.50");
  const txs = await bc.wallet.transactions({ limit: 10 });
  assert.equal(txs.transactions[0]!.id, topup.transaction.id);

  // bookings: the host hears of it live on the other process.
  const heard = nextEvent(hc, "booking.created");
  const created = await bc.bookings.create({ host_id: h.id, start_at: start, end_at: end, idempotency_key: key() });
  assert.equal(created.booking.amount, "50.00");
  assert.ok(created.booking.start_at.equals(start));
  assert.equal((await heard).booking.id, created.booking.id);
  assert.equal((await bc.bookings.get({ booking_id: created.booking.id })).status, "confirmed");
  await eventually(async () => (await hc.bookings.list({ role: "host" })).bookings.some((x) => x.id === created.booking.id),
    "the booking in the host's list");
  const busy = await bc.hosts.availability({ host_id: h.id, from: start.plus(-3600), to: end.plus(3600) });
  assert.equal(busy.busy.length, 1);

  // chat.
  const conversationId = created.booking.conversation_id!;
  await eventually(async () => (await hc.chat.conversations({})).conversations.some((c) => c.id === conversationId),
    "the conversation in the host's inbox");
  const joined = await hc.chat.join({ conversation_id: conversationId });
  assert.equal(joined.last_seq, 0);
  await bc.chat.join({ conversation_id: conversationId });
  const typing = nextEvent(hc, "chat.typing");
  assert.deepEqual(await bc.chat.typing({ conversation_id: conversationId }), {});
  assert.equal((await typing).user_id, b.id);
  const live = nextEvent(hc, "chat.message", (d) => d.message.content === "hello from the booker");
  const sent = await bc.chat.send({ conversation_id: conversationId, content: "hello from the booker" });
  assert.equal(sent.message.seq, 1);
  assert.match(sent.message.client_msg_id!, /^[0-9a-f-]{36}$/, "the SDK gave the send a client_msg_id");
  assert.equal((await live).message.id, sent.message.id);
  await eventually(async () => (await hc.chat.history({ conversation_id: conversationId })).messages.length === 1,
    "the message in the host's history");
  const history = await hc.chat.history({ conversation_id: conversationId });
  assert.deepEqual(history.messages.map((m) => m.id), [sent.message.id]);
  const readSeen = nextEvent(bc, "chat.read", (d) => d.user_id === h.id);
  assert.equal((await hc.chat.read({ conversation_id: conversationId, seq: 1 })).read_seq, 1);
  assert.equal((await readSeen).read_seq, 1, "the booker sees the host has read it");
  assert.deepEqual(await bc.chat.leave({ conversation_id: conversationId }), {});
  assert.deepEqual(bc.joinedRooms, []);

  // cancel, and the user's events since the start, numbered.
  const cancelled = await hc.bookings.cancel({ booking_id: created.booking.id });
  assert.equal(cancelled.booking.status, "cancelled");
  const resumed = await bc.events.resume({ since_seq: 0 });
  const names = resumed.events.map((e) => e.event);
  assert.ok(names.includes("booking.created") && names.includes("booking.cancelled") && names.includes("wallet.updated"), names.join());
  assert.deepEqual(resumed.events.map((e) => e.seq), resumed.events.map((_, i) => i + 1));
  assert.equal(resumed.last_seq, resumed.events.at(-1)!.seq);

  const missing = Object.keys(METHOD_AUTH).filter((m) => !called.has(m));
  assert.deepEqual(missing, [], "every method of the schema was called");
});

test("invalid params name their fields; money is refused as a float", async () => {
  const c = counted(server1.url);
  await signUp(c);
  await assert.rejects(c.wallet.topup({ amount: 12.5 as any, idempotency_key: key() }), (e: unknown) => {
    assert.ok(e instanceof RpcError);
    assert.equal(e.code, "invalid_params");
    assert.deepEqual(e.fieldErrors.map((f) => f.field), ["amount"]);
    assert.match(e.message, /amount/);
    return true;
  });
});

test("microseconds survive a round trip; a Date would lose them", async () => {
  const b = await booker(server1, counted(server1.url));
  const h = await host(server2, counted(server2.url));
  const start = slot(3);
  const { booking } = await b.client.bookings.create({ host_id: h.id, start_at: start, end_at: start.plus(3600), idempotency_key: key() });

  // Server to client: times the server made carry microseconds, and every
  // path (reply, live event, replica read) gives the same instant.
  const conversationId = booking.conversation_id!;
  await h.client.chat.join({ conversation_id: conversationId });
  const sent = [];
  for (let i = 0; i < 5; i++) {
    const live = nextEvent(h.client, "chat.message", (d) => d.message.content === `m${i}`);
    const reply = (await b.client.chat.send({ conversation_id: conversationId, content: `m${i}` })).message;
    assert.ok(reply.created_at instanceof Timestamp);
    assert.equal(reply.created_at.nanoseconds % 1000, 0, "the server keeps microseconds");
    assert.ok((await live).message.created_at.equals(reply.created_at));
    sent.push(reply);
  }
  assert.ok(sent.some((m) => m.created_at.nanoseconds % 1_000_000 !== 0), "some time has digits below the millisecond");
  const history = await b.client.chat.history({ conversation_id: conversationId });
  for (const m of sent) {
    const again = history.messages.find((x) => x.id === m.id)!;
    assert.ok(again.created_at.equals(m.created_at));
    assert.equal(again.created_at.toISOString(), m.created_at.toISOString());
    assert.match(m.created_at.toISOString(), /\.\d{6}Z$/);
  }

  // Client to server: a range ending one microsecond after the booking
  // starts overlaps it; the same end as a Date (milliseconds) does not.
  const upTo = (to: TimeInput) => b.client.hosts.availability({ host_id: h.id, from: start.plus(-3600), to });
  assert.equal((await upTo(start.plus(0, 1000))).busy.length, 1);
  assert.equal((await upTo(start.plus(0, 1000).toDate())).busy.length, 0);
  assert.equal((await upTo(start)).busy.length, 0);
  // And one starting a microsecond before it ends overlaps it too.
  const end = start.plus(3600);
  const from = (f: Timestamp) => b.client.hosts.availability({ host_id: h.id, from: f, to: end.plus(3600) });
  assert.equal((await from(end.plus(0, -1000))).busy.length, 1);
  assert.equal((await from(end)).busy.length, 0);
  // RFC 3339 strings with microseconds are read exactly as well.
  assert.equal((await upTo(start.plus(0, 1000).toISOString())).busy.length, 1);
});

test("auth.expiring: the app's callback refreshes the token and calls go on past the first token's expiry", async () => {
  const short = new ServerProcess({ ACCESS_TOKEN_TTL_S: "4", AUTH_EXPIRING_LEAD_S: "60" });
  await short.start();
  try {
    let refreshToken = "";
    let refreshes = 0;
    const c: HangoutClient = counted(short.url, {
      refreshToken: async () => {
        refreshes += 1;
        const r = await c.auth.refresh({ refresh_token: refreshToken });
        refreshToken = r.refresh_token;
        return r.access_token;
      },
    });
    const expiring = nextEvent(c, "auth.expiring");
    const person = await signUp(c);
    refreshToken = person.refreshToken;
    const firstExpiry = (await expiring).expires_at.toDate().getTime();
    // The first token's end is a time, not an event: wait past it.
    await new Promise((r) => setTimeout(r, Math.max(0, firstExpiry - Date.now()) + 1500));
    assert.ok(refreshes >= 1, "the callback ran");
    assert.equal((await c.users.me()).id, person.id);
  } finally {
    await short.stop();
  }
});
