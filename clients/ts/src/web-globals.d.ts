// The few runtime globals the core uses, all of them in browsers, React
// Native and Node alike. The core compiles against these alone (no DOM, no
// Node types), so a Node-only API cannot slip into it.
declare function setTimeout(handler: () => void, ms?: number): unknown;
declare function clearTimeout(handle: unknown): void;

interface AbortSignal {
  readonly aborted: boolean;
  readonly reason?: unknown;
  addEventListener(type: "abort", listener: () => void, options?: { once?: boolean }): void;
  removeEventListener(type: "abort", listener: () => void): void;
}

declare var crypto: { randomUUID?: () => string; getRandomValues?: <T extends Uint8Array>(array: T) => T } | undefined;
