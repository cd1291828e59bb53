/**
 * The real stack for the tests: the repository's dev stack (PostgreSQL
 * primary + replica, Redis on DEVSTACK_PORT..+3) and `python -m server`
 * processes on it, each on a port of its own, as tests/conftest.py runs them.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { createHmac, randomUUID } from "node:crypto";
import { createServer } from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../../../..");
export const PYTHON = process.env.PYTHON ?? join(ROOT, ".venv/bin/python");

function python(args: string[], env: NodeJS.ProcessEnv = process.env): string {
  const out = spawnSync(PYTHON, args, { cwd: ROOT, env, encoding: "utf8" });
  if (out.status !== 0) throw new Error(`python ${args.join(" ")} failed (${out.status}): ${out.stderr}`);
  return out.stdout;
}

let stackEnv: Record<string, string> | undefined;

/** Starts the dev stack (a no-op when it runs), migrates, and returns the
 * environment a server needs on it: database and Redis URLs and the
 * development secrets. */
export function devStack(): Record<string, string> {
  if (stackEnv) return stackEnv;
  python(["-m", "server.devstack", "start"]);
  const env: Record<string, string> = {};
  for (const line of python(["-m", "server.devstack", "status"]).split("\n")) {
    const m = /^([A-Z_]+)=(.*)$/.exec(line);
    if (m) env[m[1]!] = m[2]!;
  }
  Object.assign(env, JSON.parse(python(["-c", "import json; from server.config import dev_secrets; print(json.dumps(dev_secrets()))"])));
  python(["-m", "server", "migrate"], { ...process.env, ...env });
  stackEnv = env;
  return env;
}

export function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolvePort(port));
    });
  });
}

export class ServerProcess {
  proc: ChildProcess | undefined;
  port = 0;

  constructor(private readonly extraEnv: Record<string, string> = {}) {}

  get url(): string {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  get http(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  async start(): Promise<this> {
    this.port = await freePort();
    const env = {
      ...process.env,
      ...devStack(),
      HOST: "127.0.0.1",
      PORT: String(this.port),
      WORKERS: "1",
      HANGOUT_SKIP_MIGRATE: "1",
      LOG_LEVEL: process.env.TEST_SERVER_LOG_LEVEL ?? "WARNING",
      PYTHONUNBUFFERED: "1",
      // No metrics port: servers started side by side would all want the default one.
      METRICS_PORT: "0",
      SETTLEMENT_INTERVAL_S: "0.5",
      // Every test signs in from 127.0.0.1: the per-address limits are raised.
      MAX_SOCKETS_PER_ADDRESS: "100000",
      AUTH_MAX_PER_ADDRESS: "100000",
      HASH_MAX_WAIT_S: "60",
      ...this.extraEnv,
    };
    this.proc = spawn(PYTHON, ["-m", "server", "serve"], { cwd: ROOT, env, stdio: ["ignore", "inherit", "inherit"] });
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      if (this.proc.exitCode !== null) throw new Error(`server exited with ${this.proc.exitCode}`);
      try {
        const r = await fetch(`${this.http}/healthz`);
        if (r.status === 200) return this;
      } catch {
        // not listening yet
      }
      await new Promise((r) => setTimeout(r, 50)); // polling a process that has no event to await
    }
    throw new Error("server did not start");
  }

  /** SIGTERM (SIGKILL with `kill`), and wait for the exit. */
  async stop(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = new Promise((r) => proc.once("exit", r));
    proc.kill(signal);
    const timer = setTimeout(() => proc.kill("SIGKILL"), 20_000);
    await exited;
    clearTimeout(timer);
  }

  /** A signed KYC webhook delivery (the provider's way of verifying a user). */
  async kyc(userId: string, status: "verified" | "rejected" | "pending"): Promise<number> {
    const secret = devStack().KYC_WEBHOOK_SECRET!;
    const body = JSON.stringify({ event_id: `evt_${randomUUID()}`, user_id: userId, status });
    const t = String(Math.floor(Date.now() / 1000));
    const signature = createHmac("sha256", secret).update(`${t}.${body}`).digest("hex");
    const r = await fetch(`${this.http}/webhooks/kyc`, {
      method: "POST",
      body,
      headers: { "Content-Type": "application/json", "X-Signature": `t=${t},sha256=${signature}` },
    });
    await r.arrayBuffer();
    return r.status;
  }
}
