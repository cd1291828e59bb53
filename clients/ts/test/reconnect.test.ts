/**
 * A socket killed mid-conversation: the client reconnects with backoff,
 * signs in again, resumes its user events and re-joins its room from the
 * last seq, so the app sees every message and event once, with no gap; a
 * send made offline, and one whose reply was lost, are each stored once.
 * The booker talks through a relay the test can cut; the host is on another
 * server process.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { backoffCeiling, type HangoutClient, type Methods } from "../src/index.js";
import { booker, client, host, key, nextEvent, slot, type Person } from "./support/people.js";
import { Proxy } from "./support/proxy.js";
import { ServerProcess } from "./support/server.js";

type Message = Methods["chat.send"]["result"]["message"];

const server1 = new ServerProcess();
const server2 = new ServerProcess();
let proxy: Proxy;
const clients: HangoutClient[] = [];
const BACKOFF = { baseMs: 200, capMs: 1600 };

before(async () => {
  await Promise.all([server1.start(), server2.start()]);
  proxy = await new Proxy(server1.port).start();
});

after(async () => {
  for (const c of clients) c.close();
  await proxy.stop();
  await Promise.all([server1.stop(), server2.stop()]);
});

/** Everything an app would see: messages and user events, by seq, with repeats counted. */
class Seen {
  messages = new Map<number, Message>();
  messageRepeats: number[] = [];
  events = new Map<number, string>();
  eventRepeats: number[] = [];

  constructor(c: HangoutClient, conversationId: string) {
    c.on("chat.message", ({ message }) => {
      if (message.conversation_id !== conversationId) return;
      if (this.messages.has(message.seq)) this.messageRepeats.push(message.seq);
      this.messages.set(message.seq, message);
    });
    c.onAny((name, _data, meta) => {
      if (meta.seq === undefined) return;
      if (this.events.has(meta.seq)) this.eventRepeats.push(meta.seq);
      this.events.set(meta.seq, name);
    });
  }
}

function until(condition: () => boolean, what: string, timeoutMs = 15_000): Promise<void> {
  // A bounded poll over state the client's listeners fill in.
  const deadline = Date.now() + timeoutMs;
  return new Promise((resolve, reject) => {
    const look = () => {
      if (condition()) resolve();
      else if (Date.now() > deadline) reject(new Error(`timed out waiting for ${what}`));
      else setTimeout(look, 20);
    };
    look();
  });
}

function contiguous(seqs: Iterable<number>): boolean {
  const sorted = [...seqs].sort((a, b) => a - b);
  return sorted.every((s, i) => i === 0 || s === sorted[i - 1]! + 1);
}

async function pair(): Promise<{ b: Person; h: Person; conversationId: string; spare: string }> {
  const bc = client(proxy.url, { reconnect: BACKOFF });
  const hc = client(server2.url);
  clients.push(bc, hc);
  const [b, h] = await Promise.all([booker(server1, bc), host(server2, hc)]);
  const first = await bc.bookings.create({ host_id: h.id, start_at: slot(4), end_at: slot(4, 1), idempotency_key: key() });
  const second = await bc.bookings.create({ host_id: h.id, start_at: slot(5), end_at: slot(5, 1), idempotency_key: key() });
  const conversationId = first.booking.conversation_id!;
  await Promise.all([bc.chat.join({ conversation_id: conversationId }), hc.chat.join({ conversation_id: conversationId })]);
  return { b, h, conversationId, spare: second.booking.id };
}

test("a socket killed mid-conversation reconnects with backoff and resumes with no gap and no duplicate", async () => {
  const { b, h, conversationId, spare } = await pair();
  const bc = b.client;
  const hc = h.client;
  const seen = new Seen(bc, conversationId);
  const delays: Array<{ attempt: number; delayMs: number }> = [];
  bc.on("reconnecting", (r) => delays.push(r));

  for (let i = 0; i < 3; i++) {
    await hc.chat.send({ conversation_id: conversationId, content: `before ${i}` });
    await bc.chat.send({ conversation_id: conversationId, content: `reply ${i}` });
  }
  await until(() => seen.messages.size === 6, "the live messages");

  // The network goes: the socket is reset and reconnects are refused.
  proxy.refusing = true;
  const dropped = nextEvent(bc, "state" as any, (s: any) => s.state === "disconnected");
  proxy.cut();
  await dropped;
  await until(() => delays.length >= 4, "four refused reconnects");

  // Meanwhile the host writes, cancels a booking (two user events for the
  // booker: booking.cancelled and the refund's wallet.updated), and the
  // booker sends while offline.
  for (let i = 0; i < 3; i++) await hc.chat.send({ conversation_id: conversationId, content: `missed ${i}` });
  await hc.bookings.cancel({ booking_id: spare });
  const offline = bc.chat.send({ conversation_id: conversationId, content: "written offline" });
  const eventsBefore = new Map(seen.events);

  proxy.refusing = false;
  await bc.whenReady();
  const stored = (await offline).message;

  await until(() => seen.messages.size === 10, "the missed messages and the offline send");
  await until(() => [...seen.events.values()].includes("booking.cancelled"), "the missed booking.cancelled");

  // Backoff: every delay within its full-jitter ceiling, the ceilings growing.
  assert.deepEqual(delays.slice(0, 4).map((d) => d.attempt), [0, 1, 2, 3]);
  for (const d of delays) assert.ok(d.delayMs >= 0 && d.delayMs <= backoffCeiling(d.attempt, BACKOFF), JSON.stringify(d));

  // No gap, no duplicate, in the room and in the user's events.
  assert.deepEqual([...seen.messages.keys()].sort((x, y) => x - y), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  assert.deepEqual(seen.messageRepeats, []);
  assert.deepEqual(seen.messages.get(10)!.id, stored.id);
  assert.ok(contiguous(seen.events.keys()), [...seen.events.keys()].join());
  assert.deepEqual(seen.eventRepeats, []);
  const missed = [...seen.events].filter(([seq]) => !eventsBefore.has(seq)).map(([, name]) => name);
  assert.deepEqual(missed.sort(), ["booking.cancelled", "wallet.updated"]);
  assert.equal(bc.lastEventSeq, (await bc.users.me()).event_seq);

  // The offline send was stored once.
  // Read by the sender, whose reads see their own writes: a second copy would show.
  const history = await bc.chat.history({ conversation_id: conversationId });
  assert.equal(history.messages.filter((m) => m.content === "written offline").length, 1);
});

test("a send whose reply was lost is sent again after the reconnect and stored once", async () => {
  const { b, h, conversationId } = await pair();
  const bc = b.client;
  const hc = h.client;
  const seen = new Seen(bc, conversationId);

  // The request reaches the server, which stores the message and answers;
  // the answer never reaches the client.
  proxy.swallowReplies = true;
  const arrived = nextEvent(hc, "chat.message", (d) => d.message.content === "reply lost");
  const sending = bc.chat.send({ conversation_id: conversationId, content: "reply lost" });
  const onServer = (await arrived).message;
  proxy.cut();
  proxy.swallowReplies = false;

  const sent = (await sending).message;
  assert.equal(sent.id, onServer.id);
  assert.equal(sent.client_msg_id, onServer.client_msg_id);
  await until(() => seen.messages.has(onServer.seq), "the message as an event");
  // Read from the sender, whose reads see their own writes: a second copy would show.
  const history = await bc.chat.history({ conversation_id: conversationId });
  assert.equal(history.messages.filter((m) => m.content === "reply lost").length, 1);
  assert.deepEqual(seen.messageRepeats, []);
});

test("a server process killed: the client moves to the other one and resumes", async () => {
  const victim = new ServerProcess();
  await victim.start();
  try {
    const bc = client([victim.url, server2.url], { reconnect: BACKOFF });
    const hc = client(server1.url);
    clients.push(bc, hc);
    const [b, h] = await Promise.all([booker(victim, bc), host(server1, hc)]);
    const { booking } = await bc.bookings.create({ host_id: h.id, start_at: slot(6), end_at: slot(6, 1), idempotency_key: key() });
    const conversationId = booking.conversation_id!;
    await Promise.all([bc.chat.join({ conversation_id: conversationId }), hc.chat.join({ conversation_id: conversationId })]);
    const seen = new Seen(bc, conversationId);
    await hc.chat.send({ conversation_id: conversationId, content: "first" });
    await until(() => seen.messages.size === 1, "the first message");

    const dropped = nextEvent(bc, "state" as any, (s: any) => s.state === "disconnected");
    await victim.stop("SIGKILL");
    await dropped;
    await hc.chat.send({ conversation_id: conversationId, content: "while it was down" });
    await bc.whenReady();
    await hc.chat.send({ conversation_id: conversationId, content: "after" });
    await until(() => seen.messages.size === 3, "all three messages");
    assert.deepEqual([...seen.messages.keys()].sort(), [1, 2, 3]);
    assert.deepEqual(seen.messageRepeats, []);
    assert.equal((await bc.users.me()).id, b.id);
  } finally {
    await victim.stop();
  }
});

test("a token that expired while offline is refreshed through the app's callback before the resume", async () => {
  const short = new ServerProcess({ ACCESS_TOKEN_TTL_S: "2", AUTH_EXPIRING_LEAD_S: "0" });
  await short.start();
  const relay = await new Proxy(short.port).start();
  try {
    let refreshToken = "";
    let refreshes = 0;
    const bc: HangoutClient = client(relay.url, {
      reconnect: BACKOFF,
      refreshToken: async () => {
        refreshes += 1;
        const r = await bc.auth.refresh({ refresh_token: refreshToken });
        refreshToken = r.refresh_token;
        return r.access_token;
      },
    });
    clients.push(bc);
    const session = await bc.auth.register({ email: `ts${key().slice(0, 12)}@example.test`, password: "correct horse battery", name: "Ts", gender: "female" });
    refreshToken = session.refresh_token;
    const seen = new Seen(bc, "none");

    relay.refusing = true;
    relay.cut();
    // Meanwhile, on another device, the user tops up (one user event) and the token runs out.
    const other = client(short.url);
    clients.push(other);
    await other.auth.login({ email: session.user.email, password: "correct horse battery" });
    await other.wallet.topup({ amount: "5.00", idempotency_key: key() });
    const expiry = Date.now() + 2500; // the token's 2 s, and a margin: a time, nothing to await
    await new Promise((r) => setTimeout(r, Math.max(0, expiry - Date.now())));

    relay.refusing = false;
    await bc.whenReady();
    assert.ok(refreshes >= 1, "the callback gave a fresh token");
    await until(() => [...seen.events.values()].includes("wallet.updated"), "the top-up's event, resumed");
    assert.equal((await bc.users.me()).balance, "5.00");
  } finally {
    await relay.stop();
    await short.stop();
  }
});

test("an app restarted with its saved token and last seq is given what happened meanwhile, once", async () => {
  const first = client(server1.url);
  clients.push(first);
  const session = await first.auth.register({ email: `ts${key().slice(0, 12)}@example.test`, password: "correct horse battery", name: "Ts", gender: "female" });
  await first.wallet.topup({ amount: "1.00", idempotency_key: key() });
  await until(() => first.lastEventSeq === 1, "the first top-up's event");
  const saved = { token: session.access_token, seq: first.lastEventSeq };
  first.close();

  // While the app is closed, another device of the user tops up twice.
  const other = client(server2.url);
  clients.push(other);
  await other.auth.login({ email: session.user.email, password: "correct horse battery" });
  await other.wallet.topup({ amount: "2.00", idempotency_key: key() });
  await other.wallet.topup({ amount: "3.00", idempotency_key: key() });

  const restarted = client(server2.url, { accessToken: saved.token, lastEventSeq: saved.seq });
  clients.push(restarted);
  const balances: Array<[number, string]> = [];
  restarted.on("wallet.updated", ({ balance }, { seq }) => balances.push([seq!, balance]));
  await restarted.whenReady();
  assert.deepEqual(balances, [[2, "3.00"], [3, "6.00"]]);
  assert.equal(restarted.lastEventSeq, 3);
});
