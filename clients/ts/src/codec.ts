/**
 * Frames: one MessagePack map per binary WebSocket message. Times travel as
 * the Timestamp extension (type -1) and are read into `Timestamp`, keeping
 * the server's microseconds; a `Date` the app sends is written as one too.
 * Money and ids are strings on the wire and stay strings here.
 */
import {
  decode,
  decodeTimestampToTimeSpec,
  encode,
  encodeDateToTimeSpec,
  encodeTimeSpecToTimestamp,
  ExtensionCodec,
} from "@msgpack/msgpack";
import { Timestamp } from "./timestamp.js";

const TIMESTAMP_TYPE = -1;

const extensions = new ExtensionCodec();
extensions.register({
  type: TIMESTAMP_TYPE,
  encode(input: unknown): Uint8Array | null {
    if (input instanceof Timestamp) return encodeTimeSpecToTimestamp({ sec: input.seconds, nsec: input.nanoseconds });
    if (input instanceof Date) return encodeTimeSpecToTimestamp(encodeDateToTimeSpec(input));
    return null;
  },
  decode(data: Uint8Array): Timestamp {
    const { sec, nsec } = decodeTimestampToTimeSpec(data);
    return new Timestamp(sec, nsec);
  },
});

/** A frame as bytes. `undefined` fields are left out, never sent as nil:
 * for `users.update` an absent field and a null one mean different things. */
export function encodeFrame(frame: unknown): Uint8Array {
  return encode(frame, { extensionCodec: extensions, ignoreUndefined: true });
}

export function decodeFrame(data: ArrayBuffer | ArrayBufferView): unknown {
  return decode(data as ArrayLike<number> | ArrayBufferView | ArrayBufferLike, { extensionCodec: extensions });
}
