/**
 * The demo in Chromium: a host and a booker, each in a browser context of
 * their own and on a server process of their own, sign up, are verified by
 * the operator's KYC command, book, and chat; each sees what the other does
 * arrive live (user events, chat messages, read receipts, presence).
 * Screenshots of each step go to clients/ts/test-artifacts/demo/.
 *
 * Chromium is Debian's (`CHROMIUM`, default /usr/bin/chromium), driven by
 * playwright-core. The servers serve the checkout's built demo (the
 * default DEMO_DIR): `make test-browser` builds it first. Every wait is
 * bounded.
 */
import { spawnSync } from "node:child_process";
import { randomUUID } from "node:crypto";
import { mkdirSync, readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { chromium, type Browser, type Page } from "playwright-core";
import { devStack, PYTHON, ROOT, ServerProcess } from "../../test/support/server.js";

const ARTIFACTS = resolve(process.env.TEST_ARTIFACTS ?? join(ROOT, "clients/ts/test-artifacts"), "demo");

const WAIT_MS = 10_000;
const PASSWORD = "correct horse battery";

/** The operator command that sets a user's KYC status (README, "Operator commands"). */
function kyc(email: string, status: "verified" | "rejected" | "pending"): void {
  const env = { ...process.env, ...devStack() };
  const out = spawnSync(PYTHON, ["-m", "server", "kyc", email, status], { cwd: ROOT, env, encoding: "utf8", timeout: 60_000 });
  assert.equal(out.status, 0, `python -m server kyc failed: ${out.stderr}`);
}

/** Whether the contract has the event: read receipts and presence are of
 * the second edition, and the page shows them only when the server sends them. */
function contractHas(event: string): boolean {
  const index = JSON.parse(readFileSync(join(ROOT, "protocol/schema/index.json"), "utf8"));
  return index.events.some((e: { name: string }) => e.name === event);
}

let servers: ServerProcess[] = [];
let browser: Browser | undefined;

before(async () => {
  mkdirSync(ARTIFACTS, { recursive: true });
  servers = await Promise.all([new ServerProcess().start(), new ServerProcess().start()]);
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium" });
});

after(async () => {
  await browser?.close();
  await Promise.all(servers.map((s) => s.stop()));
});

/** One person at one browser context, on one server's /demo. */
class Person {
  readonly email = `demo${randomUUID().replace(/-/g, "").slice(0, 12)}@example.test`;
  readonly name: string;
  page!: Page;

  constructor(readonly role: string, private readonly server: ServerProcess) {
    this.name = `${role} ${randomUUID().slice(0, 6)}`;
  }

  async open(): Promise<void> {
    const context = await browser!.newContext({ viewport: { width: 900, height: 1100 } });
    this.page = await context.newPage();
    this.page.setDefaultTimeout(WAIT_MS);
    this.page.on("pageerror", (error) => console.error(`${this.role} page error:`, error));
    await this.page.goto(`${this.server.http}/demo`);
    await this.page.locator("#connection[data-state=ready]").waitFor();
  }

  async shot(step: string): Promise<void> {
    await this.page.screenshot({ path: join(ARTIFACTS, `${step}-${this.role}.png`), fullPage: true });
  }

  async signUp(): Promise<void> {
    const form = this.page.locator("#signup");
    await form.locator("[name=email]").fill(this.email);
    await form.locator("[name=password]").fill(PASSWORD);
    await form.locator("[name=name]").fill(this.name);
    await form.locator("[name=gender]").fill("female");
    await form.locator("button").click();
    await this.page.locator("#signed-in").waitFor({ state: "visible" });
    await this.page.locator("#signed-out").waitFor({ state: "hidden" });
    await this.page.locator("#kyc[data-status=pending]").waitFor();
  }

  /** The operator verifies the person; the page learns it live (user.updated). */
  async verify(): Promise<void> {
    kyc(this.email, "verified");
    await this.page.locator("#kyc[data-status=verified]").waitFor();
  }

  async text(selector: string, text: string): Promise<void> {
    await this.page.locator(selector, { hasText: text }).first().waitFor();
  }
}

test("a booker and a host sign up, book and chat in Chromium, each seeing the other live", async () => {
  const host = new Person("host", servers[0]!);
  const booker = new Person("booker", servers[1]!);
  await Promise.all([host.open(), booker.open()]);
  await Promise.all([host.shot("01-start"), booker.shot("01-start")]);

  await host.signUp();
  await booker.signUp();
  await Promise.all([host.shot("02-signed-up"), booker.shot("02-signed-up")]);
  await host.verify();
  await booker.verify();

  // The host offers their time at a price, which makes them bookable. The
  // price is the test's own, so the search finds this host among those that
  // earlier runs left on the dev stack.
  const cents = 1000 + Math.floor(Math.random() * 9000);
  const price = (cents / 100).toFixed(2);
  await host.page.locator("#offer [name=price]").fill(price);
  await host.page.locator("#offer button").click();
  await host.text("#offering", price);
  await host.shot("03-offering");

  await booker.page.locator("#topup [name=amount]").fill("100.00");
  await booker.page.locator("#topup button").click();
  await booker.text("#balance", "100.00");

  // Search is served by the replica, which sees the host's new price a
  // little later: search again, each time once the last search has
  // answered, until the host is listed (bounded).
  await booker.page.locator("#search-form [name=min_price]").fill(price);
  await booker.page.locator("#search-form [name=max_price]").fill(price);
  const hostRow = booker.page.locator("#hosts li", { hasText: host.name });
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    await booker.page.locator("#search-form button").click();
    await booker.page.locator("#search-form button:enabled").waitFor();
    if ((await hostRow.count()) > 0) break;
    assert.ok(Date.now() < deadline, "the host never appeared in the search");
  }
  await booker.shot("04-search");
  await hostRow.locator("button.book").click();

  const left = ((10_000 - cents) / 100).toFixed(2);
  // Live on both sides: the booking (booking.created) and the booker's wallet (wallet.updated).
  await booker.page.locator("#bookings li[data-status=confirmed]").waitFor();
  await booker.text("#balance", left);
  await host.page.locator("#bookings li[data-status=confirmed]").waitFor();
  await host.text("#bookings li", booker.name);
  await Promise.all([host.shot("05-booked"), booker.shot("05-booked")]);

  await booker.page.locator("#bookings li[data-status=confirmed] button.open-chat").click();
  await host.page.locator("#bookings li[data-status=confirmed] button.open-chat").click();
  await booker.text("#chat-peer", host.name);
  await host.text("#chat-peer", booker.name);

  await booker.page.locator("#chat-form input").fill("Hello from the booker");
  await booker.page.locator("#chat-form button").click();
  await host.text("#messages li.theirs", "Hello from the booker");

  await host.page.locator("#chat-form input").fill("Hello back from the host");
  await host.page.locator("#chat-form button").click();
  await booker.text("#messages li.theirs", "Hello back from the host");

  // Read receipts: each has the chat open, so each one's message shows as read.
  if (contractHas("chat.read")) {
    await booker.page.locator("#messages li.mine .meta", { hasText: "read" }).waitFor();
    await host.page.locator("#messages li.mine .meta", { hasText: "read" }).waitFor();
  }
  if (contractHas("chat.presence")) {
    await host.page.locator("#presence[data-online=true]").waitFor();
    await booker.page.locator("#presence[data-online=true]").waitFor();
  }
  await Promise.all([host.shot("06-chat"), booker.shot("06-chat")]);

  // Each message once, though it came both as the send's reply and as an event.
  assert.equal(await booker.page.locator("#messages li").count(), 2);
  assert.equal(await host.page.locator("#messages li").count(), 2);

  // A reload keeps the tab signed in (its refresh token), with its bookings.
  await host.page.reload();
  await host.page.locator("#signed-in").waitFor({ state: "visible" });
  await host.page.locator("#bookings li[data-status=confirmed]").waitFor();

  // Logging out and in again, on the other server: the same account and booking.
  await booker.page.locator("#logout").click();
  await booker.page.locator("#signed-out").waitFor({ state: "visible" });
  await booker.page.goto(`${servers[0]!.http}/demo`);
  await booker.page.locator("#login [name=email]").fill(booker.email);
  await booker.page.locator("#login [name=password]").fill(PASSWORD);
  await booker.page.locator("#login button").click();
  await booker.page.locator("#bookings li[data-status=confirmed]").waitFor();
  await booker.text("#balance", left);

  // The booker's new message reaches the host, who left the chat by reloading
  // and now sees it as an unread count on the booking.
  await booker.page.locator("#bookings li[data-status=confirmed] button.open-chat").click();
  await booker.text("#messages li.theirs", "Hello back from the host");
  await booker.page.locator("#chat-form input").fill("Are you there?");
  await booker.page.locator("#chat-form button").click();
  if (contractHas("chat.read")) await host.text("#bookings [data-unread]", "1");
  await Promise.all([host.shot("07-after-reload"), booker.shot("07-after-login")]);

  if (contractHas("chat.presence")) {
    // The booker leaves: the host, in the chat again, sees them go offline (within 5 s + a margin).
    await host.page.locator("#bookings li[data-status=confirmed] button.open-chat").click();
    await host.text("#messages li.theirs", "Are you there?");
    await host.page.locator("#presence[data-online=true]").waitFor();
    await booker.page.context().close();
    await host.page.locator("#presence[data-online=false]").waitFor({ timeout: 15_000 });
    await host.shot("08-peer-offline");
  }
});
