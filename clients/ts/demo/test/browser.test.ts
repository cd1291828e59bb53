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
import { mkdirSync } from "node:fs";
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

  // The host offers their time at a price, which makes them bookable.
  await host.page.locator("#offer [name=price]").fill("40.00");
  await host.page.locator("#offer button").click();
  await host.text("#offering", "40.00");
  await host.shot("03-offering");

  await booker.page.locator("#topup [name=amount]").fill("100.00");
  await booker.page.locator("#topup button").click();
  await booker.text("#balance", "100.00");

  // Search is served by the replica, which sees the host's new price a
  // little later: search again, each time once the last search has
  // answered, until the host is listed (bounded).
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

  // Live on both sides: the booking (booking.created) and the booker's wallet (wallet.updated).
  await booker.page.locator("#bookings li[data-status=confirmed]").waitFor();
  await booker.text("#balance", "60.00");
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

  // Read receipts: the host has the chat open, so the booker's message shows as read.
  await booker.page.locator("#messages li.mine .meta", { hasText: "read" }).waitFor();
  await host.page.locator("#messages li.mine .meta", { hasText: "read" }).waitFor();

  // Presence (2nd ed.): both are online. A server without it sends no
  // presence, and the page shows none.
  for (const person of [host, booker]) {
    const pill = person.page.locator("#presence");
    if (await pill.isVisible()) assert.equal(await pill.getAttribute("data-online"), "true");
  }
  await Promise.all([host.shot("06-chat"), booker.shot("06-chat")]);

  // Only what the page shows, not what was typed: each message once.
  assert.equal(await booker.page.locator("#messages li").count(), 2);
  assert.equal(await host.page.locator("#messages li").count(), 2);
});
