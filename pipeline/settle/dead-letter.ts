/**
 * What a dead letter carries (protocol, "Dead letters"): the request's body and headers, and
 * headers saying why and where it came from. Built here once for the DLQ stream and for a
 * replay's dead letters.
 */
import { headers as natsHeaders, type MsgHdrs } from "@nats-io/transport-node";
import type { DeadLetter } from "../../operators/settle-outcome.js";
import { H, TOKEN_RE, UNKNOWN_TOKEN } from "../../proto/wire.js";
import { sanitizeHeader } from "../support/headers.js";

/** Headers of a request that are not copied into its dead letter (the letter sets its own). */
const NOT_COPIED = new Set(["nats-msg-id", "nats-expected-stream", "nats-expected-last-sequence", "nats-expected-last-msg-id"]);
/** Longest request id kept in a letter whose request is omitted. */
const BRIEF_ID_CHARS = 128;

/**
 * The headers of a dead letter. `brief`: the request with its headers is too large for a letter,
 * so none of its headers are copied, and `Infer-Body-Omitted` says where the request is.
 */
export function deadLetterHeaders(letter: DeadLetter, opts: { brief?: boolean } = {}): MsgHdrs {
  const d = letter.delivery;
  const h = natsHeaders();
  if (!opts.brief) for (const [k, v] of d.headerEntries()) if (!NOT_COPIED.has(k.toLowerCase())) h.append(k, v);
  const originalId = d.header(H.msgId);
  if (originalId !== undefined) h.set(H.requestId, opts.brief ? sanitizeHeader(originalId).slice(0, BRIEF_ID_CHARS) : sanitizeHeader(originalId));
  h.set(H.originalSubject, opts.brief ? d.subject.slice(0, 1024) : d.subject);
  h.set(H.errorCode, letter.error.code);
  h.set(H.errorReason, sanitizeHeader(letter.error.message));
  h.set(H.deliveries, String(d.deliveryCount));
  h.set(H.originalSeq, String(d.seq));
  if (opts.brief) {
    h.set(H.bodyOmitted, `request of ${d.data.length} bytes with its headers is over the message size limit; read it from INFER_REQ sequence ${d.seq}`);
  }
  return h;
}

/** The tenant and model tokens of a letter's subject: `_unknown` for one that is unusable. */
export function deadLetterTokens(letter: DeadLetter): { tenant: string; model: string } {
  const tenant = letter.tenant !== undefined && TOKEN_RE.test(letter.tenant) ? letter.tenant : UNKNOWN_TOKEN;
  const model = letter.model !== undefined && TOKEN_RE.test(letter.model) ? letter.model : UNKNOWN_TOKEN;
  return { tenant, model };
}
