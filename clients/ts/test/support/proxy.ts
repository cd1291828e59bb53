/**
 * A TCP relay between a client and a server, which a test can cut (every
 * connection reset at once, as a phone losing its network), refuse (new
 * connections dropped, so the client's reconnects fail and back off), or
 * make swallow the server's replies (so a request reaches the server but its
 * reply never reaches the client).
 */
import { createServer, connect, type Server, type Socket } from "node:net";

export class Proxy {
  private server: Server | undefined;
  private readonly pairs = new Set<[Socket, Socket]>();
  port = 0;
  refusing = false;
  swallowReplies = false;
  /** Connections accepted (refused ones included). */
  accepted = 0;

  constructor(private readonly targetPort: number) {}

  get url(): string {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  async start(): Promise<this> {
    this.server = createServer((down) => this.accept(down));
    await new Promise<void>((r) => this.server!.listen(0, "127.0.0.1", r));
    this.port = (this.server.address() as { port: number }).port;
    return this;
  }

  private accept(down: Socket): void {
    this.accepted += 1;
    if (this.refusing) {
      down.destroy();
      return;
    }
    const up = connect(this.targetPort, "127.0.0.1");
    const pair: [Socket, Socket] = [down, up];
    this.pairs.add(pair);
    down.on("data", (chunk) => up.write(chunk));
    up.on("data", (chunk) => {
      if (!this.swallowReplies) down.write(chunk);
    });
    const end = () => {
      this.pairs.delete(pair);
      down.destroy();
      up.destroy();
    };
    down.on("close", end).on("error", end);
    up.on("close", end).on("error", end);
  }

  /** Resets every open connection. */
  cut(): void {
    for (const [down, up] of this.pairs) {
      down.resetAndDestroy();
      up.destroy();
    }
    this.pairs.clear();
  }

  get open(): number {
    return this.pairs.size;
  }

  async stop(): Promise<void> {
    this.cut();
    await new Promise((r) => this.server?.close(r));
  }
}
