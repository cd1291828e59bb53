/**
 * The client's own logic, without a server: the Timestamp type and codec,
 * backoff, and the de-duplication and flow control that the server tests
 * cannot force on demand (a frame repeated in a resume and live, replies in
 * any order, the in-flight window). A scripted socket stands in for the
 * network here only; the guarantees end to end are in methods.test.ts and
 * reconnect.test.ts, against real servers.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  backoffCeiling,
  backoffDelay,
  ConnectionLostError,
  decodeFrame,
  encodeFrame,
  HangoutClient,
  SeqTracker,
  Timestamp,
  TimeoutError,
  type WebSocketLike,
} from "../src/index.js";

test("Timestamp keeps nanoseconds through the codec and prints microseconds", () => {
  const t = new Timestamp(1_764_929_045, 123_456_000);
  const back = decodeFrame(encodeFrame({ t })) as { t: Timestamp };
  assert.ok(back.t instanceof Timestamp && back.t.equals(t));
  assert.equal(t.toISOString(), "2025-12-05T10:04:05.123456Z");
  assert.equal(new Timestamp(0, 1).toISOString(), "1970-01-01T00:00:00.000000001Z");
  assert.equal(t.toDate().toISOString(), "2025-12-05T10:04:05.123Z");
  assert.ok(Timestamp.parse("2025-12-05T12:04:05.123456+02:00").equals(t));
  assert.ok(Timestamp.fromMicroseconds(t.toMicroseconds()).equals(t));
  assert.ok(Timestamp.fromMicroseconds(-1n).equals(new Timestamp(-1, 999_999_000)));
  assert.ok(new Timestamp(5, 999_999_999).plus(0, 1).equals(new Timestamp(6, 0)));
  assert.throws(() => Timestamp.parse("2025-12-05T10:04:05"), RangeError);
  const date = decodeFrame(encodeFrame({ d: new Date(1500) })) as { d: Timestamp };
  assert.ok(date.d.equals(new Timestamp(1, 500_000_000)));
});

test("undefined params are left out, null is sent", () => {
  const frame = decodeFrame(encodeFrame({ a: undefined, b: null })) as Record<string, unknown>;
  assert.deepEqual(Object.keys(frame), ["b"]);
});

test("backoff: full jitter under an exponential, capped ceiling", () => {
  const o = { baseMs: 100, capMs: 1000 };
  assert.deepEqual([0, 1, 2, 3, 4, 5].map((a) => backoffCeiling(a, o)), [100, 200, 400, 800, 1000, 1000]);
  assert.equal(backoffDelay(3, { ...o, random: () => 0.5 }), 400);
  assert.equal(backoffDelay(3, { ...o, random: () => 0 }), 0);
});

test("SeqTracker: each seq once, in any order; the floor is where a resume starts", () => {
  const s = new SeqTracker(2);
  assert.equal(s.accept(2), false);
  assert.equal(s.accept(4), true);
  assert.equal(s.floor, 2);
  assert.equal(s.accept(4), false);
  assert.equal(s.accept(3), true);
  assert.equal(s.floor, 4);
  s.raiseFloor(10);
  assert.equal(s.accept(7), false);
  assert.equal(s.highest, 10);
});

// ---- a scripted socket ---------------------------------------------------

class ScriptedSocket implements WebSocketLike {
  static all: ScriptedSocket[] = [];
  binaryType = "blob";
  readyState = 0;
  sent: any[] = [];
  onopen: ((ev: any) => void) | null = null;
  onmessage: ((ev: { data: any }) => void) | null = null;
  onclose: ((ev: { code: number }) => void) | null = null;
  onerror: ((ev: any) => void) | null = null;
  private waiters: Array<() => void> = [];

  constructor(readonly url: string, readonly protocols?: string | string[]) {
    ScriptedSocket.all.push(this);
  }
  send(data: Uint8Array): void {
    this.sent.push(decodeFrame(data));
    for (const w of this.waiters.splice(0)) w();
  }
  close(): void {
    this.readyState = 3;
  }
  open(): void {
    this.readyState = 1;
    this.onopen?.({});
  }
  push(frame: unknown): void {
    const bytes = encodeFrame(frame);
    this.onmessage?.({ data: bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) });
  }
  /** The next request sent of `method` (waits for it). */
  async request(method: string, from = 0): Promise<any> {
    for (let i = 0; i < 1000; i++) {
      const found = this.sent.slice(from).find((f) => f.method === method);
      if (found) return found;
      await new Promise<void>((r) => this.waiters.push(r));
    }
    throw new Error(`no ${method}`);
  }
}

function scripted(options = {}): { c: HangoutClient; ws: ScriptedSocket } {
  ScriptedSocket.all = [];
  const c = new HangoutClient({ url: "ws://test/ws", WebSocket: ScriptedSocket, reconnect: false, ...options });
  const ws = ScriptedSocket.all[0]!;
  ws.open();
  return { c, ws };
}

const user = { id: "u1", event_seq: 3 };

test("the socket asks for the hangout.v1 subprotocol and binary frames", () => {
  const { c, ws } = scripted();
  assert.deepEqual(ws.protocols, ["hangout.v1"]);
  assert.equal(ws.binaryType, "arraybuffer");
  c.close();
});

test("a user event both in a resume and live reaches the app once", async () => {
  const { c, ws } = scripted({ accessToken: "t", lastEventSeq: 1 });
  const got: number[] = [];
  c.onAny((_n, _d, meta) => meta.seq !== undefined && got.push(meta.seq));
  const auth = await ws.request("auth.authenticate");
  ws.push({ id: auth.id, result: { user } });
  const resume = await ws.request("events.resume");
  assert.equal(resume.params.since_seq, 1);
  ws.push({ event: "wallet.updated", data: { balance: "1.00" }, seq: 3 }); // live, during the resume
  ws.push({
    id: resume.id,
    result: {
      events: [2, 3].map((seq) => ({ event: "wallet.updated", data: { balance: "1.00" }, seq })),
      last_seq: 3,
      has_more: false,
      truncated: false,
    },
  });
  await c.whenReady();
  ws.push({ event: "wallet.updated", data: { balance: "1.00" }, seq: 3 });
  ws.push({ event: "wallet.updated", data: { balance: "1.00" }, seq: 5 }); // out of order
  ws.push({ event: "wallet.updated", data: { balance: "1.00" }, seq: 4 });
  assert.deepEqual(got, [3, 2, 5, 4]);
  assert.equal(c.lastEventSeq, 5);
  c.close();
});

test("a chat message repeated live is delivered once per seq", async () => {
  const { c, ws } = scripted();
  await c.whenReady();
  const joining = c.chat.join({ conversation_id: "c1" });
  const join = await ws.request("chat.join");
  ws.push({ id: join.id, result: { conversation: {}, messages: [{ seq: 1, conversation_id: "c1" }], last_seq: 1, truncated: false } });
  await joining;
  const seqs: number[] = [];
  c.on("chat.message", ({ message }) => seqs.push(message.seq));
  for (const seq of [1, 2, 2, 3]) ws.push({ event: "chat.message", data: { message: { seq, conversation_id: "c1" } } });
  assert.deepEqual(seqs, [2, 3]);
  c.close();
});

test("calls are pipelined up to the in-flight window, replies matched in any order, timeouts kept", async () => {
  const { c, ws } = scripted({ maxInFlight: 2, callTimeoutMs: 50 });
  await c.whenReady();
  const calls = [1, 2, 3].map((n) => c.users.get({ user_id: `u${n}` }));
  await ws.request("users.get");
  assert.equal(ws.sent.length, 2, "the third waits for a free slot");
  ws.push({ id: ws.sent[1].id, result: { id: "u2" } });
  assert.equal((await calls[1]!).id, "u2");
  assert.equal(ws.sent.length, 3);
  ws.push({ id: ws.sent[2].id, result: { id: "u3" } });
  assert.equal((await calls[2]!).id, "u3");
  await assert.rejects(calls[0]!, TimeoutError);
  c.close();
});

test("a conversation's sends go one at a time, in the order they were made", async () => {
  const { c, ws } = scripted();
  await c.whenReady();
  const first = c.chat.send({ conversation_id: "c1", content: "1" });
  const second = c.chat.send({ conversation_id: "c1", content: "2" });
  const elsewhere = c.chat.send({ conversation_id: "c2", content: "3" });
  await ws.request("chat.send");
  assert.deepEqual(ws.sent.map((f) => f.params.content), ["1", "3"]);
  ws.push({ id: ws.sent[0].id, result: { message: { seq: 1 } } });
  await first;
  assert.deepEqual(ws.sent.map((f) => f.params.content), ["1", "3", "2"]);
  ws.push({ id: ws.sent[1].id, result: { message: { seq: 1 } } });
  ws.push({ id: ws.sent[2].id, result: { message: { seq: 2 } } });
  await Promise.all([second, elsewhere]);
  c.close();
});

test("chat.send always carries a client_msg_id, kept when the app gives one", async () => {
  const { c, ws } = scripted();
  await c.whenReady();
  void c.chat.send({ conversation_id: "c1", content: "x" }).catch(() => {});
  void c.chat.send({ conversation_id: "c1", content: "y", client_msg_id: "given" }).catch(() => {});
  const firstSend = await ws.request("chat.send");
  ws.push({ id: firstSend.id, result: { message: { seq: 1 } } });
  await ws.request("chat.send", 1);
  const sends = ws.sent.filter((f) => f.method === "chat.send");
  assert.match(sends[0].params.client_msg_id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.equal(sends[1].params.client_msg_id, "given");
  c.close();
});

test("the core uses no Node-only API: no node: imports, no Buffer or process", async () => {
  const { readdirSync, readFileSync } = await import("node:fs");
  const { join } = await import("node:path");
  const src = join(import.meta.dirname ?? new URL(".", import.meta.url).pathname, "../../src");
  const offenders = [];
  for (const name of readdirSync(src, { recursive: true }) as string[]) {
    if (!name.endsWith(".ts")) continue;
    const text = readFileSync(join(src, name), "utf8");
    if (/from "node:|require\(|\bBuffer\b|\bprocess\./.test(text)) offenders.push(name);
  }
  assert.deepEqual(offenders, []);
});

test("src/generated/api.ts is what the generator makes of protocol/schema", async (t) => {
  const { existsSync, mkdtempSync, readFileSync } = await import("node:fs");
  const { join } = await import("node:path");
  const { tmpdir } = await import("node:os");
  const { spawnSync } = await import("node:child_process");
  const here = import.meta.dirname ?? new URL(".", import.meta.url).pathname;
  const pkg = join(here, "../..");
  const schema = join(pkg, "../../protocol/schema");
  if (!existsSync(join(schema, "index.json"))) {
    t.skip("no protocol/schema in this checkout");
    return;
  }
  const out = join(mkdtempSync(join(tmpdir(), "hangout-api-")), "api.ts");
  const run = spawnSync(process.execPath, [join(pkg, "scripts/generate.mjs"), schema, out], { encoding: "utf8" });
  assert.equal(run.status, 0, run.stderr);
  assert.equal(readFileSync(join(pkg, "src/generated/api.ts"), "utf8"), readFileSync(out, "utf8"),
    "stale: run `npm run generate` in clients/ts and commit src/generated/api.ts");
});

test("a call that meets token_expired gets a fresh token from the app and is sent once more", async () => {
  let asked = 0;
  const { c, ws } = scripted({ refreshToken: async () => `fresh-${++asked}` });
  await c.whenReady();
  const me = c.users.me();
  const first = await ws.request("users.me");
  ws.push({ id: first.id, error: { code: "token_expired", message: "expired" } });
  const auth = await ws.request("auth.authenticate");
  assert.equal(auth.params.access_token, "fresh-1");
  ws.push({ id: auth.id, result: { user } });
  const again = await ws.request("users.me", ws.sent.indexOf(auth));
  assert.notEqual(again.id, first.id);
  ws.push({ id: again.id, result: { id: "u1" } });
  assert.equal((await me).id, "u1");
  assert.equal(asked, 1);
  c.close();
});

test("on a dropped socket, a harmless call is sent again and a sign-in fails as unknown", async () => {
  ScriptedSocket.all = [];
  const c = new HangoutClient({ url: "ws://test/ws", WebSocket: ScriptedSocket, reconnect: { baseMs: 1, capMs: 1 } });
  const ws = ScriptedSocket.all[0]!;
  ws.open();
  await c.whenReady();
  const login = c.auth.login({ email: "a@b.c", password: "x" });
  const send = c.chat.send({ conversation_id: "c1", content: "once" });
  const sent = await ws.request("chat.send");
  ws.onclose?.({ code: 1006 });
  await assert.rejects(login, ConnectionLostError);
  for (let i = 0; i < 100 && ScriptedSocket.all.length < 2; i++) await new Promise((r) => setTimeout(r, 5));
  const next = ScriptedSocket.all[1]!;
  next.open();
  const resent = await next.request("chat.send");
  assert.equal(resent.params.client_msg_id, sent.params.client_msg_id);
  next.push({ id: resent.id, result: { message: { seq: 1 } } });
  assert.equal((await send).message.seq, 1);
  c.close();
});
