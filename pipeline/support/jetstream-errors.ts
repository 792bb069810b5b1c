/**
 * JetStream API error codes by name: nats.js's own `JetStreamApiCodes` where it names them, and
 * the two more this project reacts to (nats-server's `JSStreamNameExistErr` and
 * `JSConsumerAlreadyExists`), which nats.js does not name.
 */
import { JetStreamApiCodes, JetStreamApiError } from "@nats-io/jetstream";

/** Everything nats.js names, plus the server's codes sluice reacts to. */
export const JsApiCode = {
  ...JetStreamApiCodes,
  /** Another process created the stream first (with another configuration). */
  StreamNameInUse: 10058,
  /** Another process created the consumer first. */
  ConsumerAlreadyExists: 10148,
} as const;

/** True for a JetStream API error with one of `codes`. */
export function isJsApiError(err: unknown, ...codes: number[]): err is JetStreamApiError {
  return err instanceof JetStreamApiError && codes.includes(err.code);
}
