/** A small typed event emitter: no Node `events` module in the core. */
export type Listener<T> = (data: T, meta: EventMeta) => void;

export interface EventMeta {
  /** The user event's number, for numbered events. */
  seq?: number;
  /** True when it came from a resume or re-join rather than live. */
  replayed?: boolean;
}

export class Emitter<M> {
  private readonly listeners = new Map<keyof M, Set<Listener<any>>>();
  private readonly any = new Set<(name: string, data: unknown, meta: EventMeta) => void>();
  /** Called when a listener throws: one app bug must not stop the stream. */
  onListenerError: (error: unknown) => void = (error) => {
    setTimeout(() => {
      throw error;
    });
  };

  on<K extends keyof M>(name: K, listener: Listener<M[K]>): () => void {
    let set = this.listeners.get(name);
    if (!set) this.listeners.set(name, (set = new Set()));
    set.add(listener);
    return () => set!.delete(listener);
  }

  once<K extends keyof M>(name: K, listener: Listener<M[K]>): () => void {
    const off = this.on(name, (data, meta) => {
      off();
      listener(data, meta);
    });
    return off;
  }

  /** Every event, by name. */
  onAny(listener: (name: string, data: unknown, meta: EventMeta) => void): () => void {
    this.any.add(listener);
    return () => this.any.delete(listener);
  }

  emit<K extends keyof M>(name: K, data: M[K], meta: EventMeta = {}): void {
    for (const listener of [...(this.listeners.get(name) ?? [])]) {
      try {
        listener(data, meta);
      } catch (error) {
        this.onListenerError(error);
      }
    }
    for (const listener of [...this.any]) {
      try {
        listener(String(name), data, meta);
      } catch (error) {
        this.onListenerError(error);
      }
    }
  }
}
