/**
 * The JetStream consumer of a tenant's lane: its configuration as it is created (open, starting
 * at a stream sequence, filtered to the tenant's requests of one priority).
 */
import { AckPolicy, DeliverPolicy, type ConsumerConfig } from "@nats-io/jetstream";
import { nanos } from "@nats-io/transport-node";
import type { Priority } from "../../proto/wire.js";
import type { ConsumerSettings } from "../config.js";
import { describeLane, laneConsumerName } from "./lane-protocol.js";

/** The lane of `tenant` at priority `p`, opened by process `owner` at stream sequence `start`. */
export const laneConsumerConfig = (c: ConsumerSettings, owner: string, p: Priority, tenant: string, start: number): ConsumerConfig =>
  ({
    durable_name: laneConsumerName(c.durablePrefix, p, tenant),
    description: describeLane({ stage: "open", owner, start }),
    ack_policy: AckPolicy.Explicit,
    deliver_policy: DeliverPolicy.StartSequence,
    opt_start_seq: start,
    filter_subject: `infer.req.${p}.${tenant}.*`,
    ack_wait: nanos(c.ackWaitMs),
    max_deliver: -1,
    max_ack_pending: c.maxAckPending,
  }) as ConsumerConfig;
