/**
 * Which numbers of a sequence (a user's events, a conversation's messages)
 * the app has been given, so that each reaches it once. Live frames may come
 * out of order (two writers racing) and again in a resume, so the tracker
 * keeps a floor below which everything was seen, plus the seen numbers above
 * it; the floor is where a resume starts.
 */
export class SeqTracker {
  private floorSeq: number;
  private readonly above = new Set<number>();

  constructor(floor = 0) {
    this.floorSeq = floor;
  }

  /** Every number up to this one has been seen (or deliberately skipped). */
  get floor(): number {
    return this.floorSeq;
  }

  /** The highest number seen. */
  get highest(): number {
    let top = this.floorSeq;
    for (const seq of this.above) if (seq > top) top = seq;
    return top;
  }

  /** True the first time `seq` is offered, false for a repeat. */
  accept(seq: number): boolean {
    if (seq <= this.floorSeq || this.above.has(seq)) return false;
    this.above.add(seq);
    this.advance();
    return true;
  }

  /** Counts everything up to `seq` as seen (a resume reached it, or the
   * app's state was re-read up to it). */
  raiseFloor(seq: number): void {
    if (seq <= this.floorSeq) return;
    this.floorSeq = seq;
    for (const s of this.above) if (s <= seq) this.above.delete(s);
    this.advance();
  }

  private advance(): void {
    while (this.above.delete(this.floorSeq + 1)) this.floorSeq += 1;
  }
}
