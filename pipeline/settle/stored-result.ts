/**
 * The stored result of a request, looked up in INFER_RES under both of its subjects: by the
 * pipeline (before running a redelivered request, and when settling), the client and the DLQ.
 */
import type { JetStreamManager, StoredMsg } from "@nats-io/jetstream";
import { subjects, STREAM_RESULTS } from "../../proto/wire.js";

/**
 * The stored result of a request: under `infer.res.<tenant>.<id>`, or, when the stream refused
 * it there and it was stored afterwards without reaching the client twice, under
 * `infer.kept.<tenant>.<id>`. Null when neither holds one.
 */
export function getStoredResult(jsm: JetStreamManager, tenant: string, id: string): Promise<StoredMsg | null> {
  return findStoredResult((q) => jsm.streams.getMessage(STREAM_RESULTS, q), tenant, id);
}

/** The stored result of a request through `get` (a get by last subject on INFER_RES): both subjects, in order. */
export async function findStoredResult(
  get: (query: { last_by_subj: string }) => Promise<StoredMsg | null>,
  tenant: string,
  id: string,
): Promise<StoredMsg | null> {
  return (await get({ last_by_subj: subjects.result(tenant, id) })) ?? (await get({ last_by_subj: subjects.kept(tenant, id) }));
}

/**
 * {@link getStoredResult} as a client may do it: by direct get, whose API subject names the
 * result's subject, so a tenant's permissions can allow its own results only (see
 * infra/nats/accounts.conf). Any replica may answer, so a result stored a moment ago may not be
 * seen yet; the pipeline itself uses {@link getStoredResult}.
 */
export function getStoredResultDirect(jsm: JetStreamManager, tenant: string, id: string): Promise<StoredMsg | null> {
  return findStoredResult((q) => jsm.direct.getMessage(STREAM_RESULTS, q), tenant, id);
}
