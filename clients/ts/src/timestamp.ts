/**
 * A point in time as the server sends it: whole seconds since the Unix epoch
 * (UTC) and nanoseconds within the second. The server keeps microseconds
 * (PostgreSQL's precision); a JS Date keeps milliseconds, so times are read
 * into this class rather than a Date, and `toDate()` is the lossy step the
 * app takes on purpose.
 */
export class Timestamp {
  readonly seconds: number;
  readonly nanoseconds: number;

  constructor(seconds: number, nanoseconds = 0) {
    if (!Number.isSafeInteger(seconds)) throw new RangeError(`seconds must be a safe integer, got ${seconds}`);
    if (!Number.isInteger(nanoseconds) || nanoseconds < 0 || nanoseconds >= 1e9) {
      throw new RangeError(`nanoseconds must be an integer in [0, 1e9), got ${nanoseconds}`);
    }
    this.seconds = seconds;
    this.nanoseconds = nanoseconds;
  }

  static fromDate(date: Date): Timestamp {
    const ms = date.getTime();
    if (!Number.isFinite(ms)) throw new RangeError("invalid Date");
    const seconds = Math.floor(ms / 1000);
    return new Timestamp(seconds, (ms - seconds * 1000) * 1e6);
  }

  /** Microseconds since the epoch (a bigint holds them all exactly). */
  static fromMicroseconds(us: bigint): Timestamp {
    const seconds = us >= 0n ? us / 1_000_000n : -((-us + 999_999n) / 1_000_000n);
    return new Timestamp(Number(seconds), Number(us - seconds * 1_000_000n) * 1000);
  }

  /**
   * An RFC 3339 time with an offset ("2026-12-05T10:00:00.123456Z",
   * "...+02:00"), up to nanoseconds. Anything else is a RangeError.
   */
  static parse(text: string): Timestamp {
    const m = /^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})$/.exec(text);
    if (!m) throw new RangeError(`not an RFC 3339 time with an offset: ${JSON.stringify(text)}`);
    const [, y, mo, d, h, mi, s, frac = "", zone] = m;
    const day = new Date(0);
    day.setUTCFullYear(Number(y), Number(mo) - 1, Number(d));
    day.setUTCHours(Number(h), Number(mi), Number(s), 0);
    let offset = 0;
    if (zone !== "Z" && zone !== "z") {
      const sign = zone![0] === "-" ? -1 : 1;
      offset = sign * (Number(zone!.slice(1, 3)) * 3600 + Number(zone!.slice(4, 6)) * 60);
    }
    return new Timestamp(day.getTime() / 1000 - offset, Number(frac.padEnd(9, "0")));
  }

  static now(): Timestamp {
    return Timestamp.fromDate(new Date());
  }

  /** Microseconds within the second (0-999999). */
  get microseconds(): number {
    return Math.floor(this.nanoseconds / 1000);
  }

  /** Microseconds since the epoch, exactly (nanoseconds below are dropped). */
  toMicroseconds(): bigint {
    return BigInt(this.seconds) * 1_000_000n + BigInt(this.microseconds);
  }

  /** A Date: the part below the millisecond is dropped. */
  toDate(): Date {
    return new Date(this.seconds * 1000 + Math.floor(this.nanoseconds / 1e6));
  }

  /** RFC 3339 in UTC with six fraction digits (nine when there are nanoseconds). */
  toISOString(): string {
    const base = new Date(this.seconds * 1000).toISOString().slice(0, -5); // drop ".000Z"
    const digits = String(this.nanoseconds).padStart(9, "0");
    return `${base}.${this.nanoseconds % 1000 === 0 ? digits.slice(0, 6) : digits}Z`;
  }

  toJSON(): string {
    return this.toISOString();
  }

  toString(): string {
    return this.toISOString();
  }

  /** A copy moved by whole seconds and nanoseconds (either may be negative). */
  plus(seconds: number, nanoseconds = 0): Timestamp {
    const total = this.nanoseconds + nanoseconds;
    const carry = Math.floor(total / 1e9);
    return new Timestamp(this.seconds + seconds + carry, total - carry * 1e9);
  }

  compare(other: Timestamp): number {
    return this.seconds - other.seconds || this.nanoseconds - other.nanoseconds;
  }

  equals(other: Timestamp): boolean {
    return this.seconds === other.seconds && this.nanoseconds === other.nanoseconds;
  }
}
