/**
 * Publishes over a bare NATS protocol connection, byte for byte, so a test can send what a
 * well-behaved client library refuses to (header blocks with bare LF, invalid header names).
 * Any client in any language can send these, so the pipeline must survive them.
 */
import { connect as tcpConnect, type Socket } from "node:net";

const CONNECT = `CONNECT ${JSON.stringify({ verbose: false, pedantic: false, headers: true, no_responders: false, protocol: 1, lang: "raw", version: "0" })}\r\n`;
const TIMEOUT_MS = 5_000;

export interface RawMessage {
  subject: string;
  /** The whole header block, `NATS/1.0\r\n...\r\n\r\n`, or undefined for none. */
  headerBlock?: string;
  data: Uint8Array;
}

/** Sends the messages and resolves once the server answered a PING after them (so it read them all). */
export async function rawPublish(url: string, messages: readonly RawMessage[], user?: { user: string; pass: string }): Promise<void> {
  const u = new URL(url);
  const socket: Socket = tcpConnect({ host: u.hostname, port: Number(u.port) });
  let received = "";
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no PONG from ${url} within ${TIMEOUT_MS} ms; got: ${received.slice(0, 500)}`)), TIMEOUT_MS);
      socket.on("error", (err) => {
        clearTimeout(timer);
        reject(err);
      });
      socket.on("data", (b: Buffer) => {
        received += b.toString("latin1");
        if (received.includes("-ERR")) {
          clearTimeout(timer);
          reject(new Error(`server refused: ${received.slice(received.indexOf("-ERR"), received.indexOf("-ERR") + 200)}`));
        } else if (received.includes("PONG\r\n")) {
          clearTimeout(timer);
          resolve();
        }
      });
      socket.once("connect", () => {
        const connectLine = user
          ? `CONNECT ${JSON.stringify({ verbose: false, pedantic: false, headers: true, protocol: 1, user: user.user, pass: user.pass })}\r\n`
          : CONNECT;
        const parts: Buffer[] = [Buffer.from(connectLine, "latin1")];
        for (const m of messages) {
          const hdr = m.headerBlock === undefined ? undefined : Buffer.from(m.headerBlock, "utf8");
          const body = Buffer.from(m.data);
          if (hdr) {
            parts.push(Buffer.from(`HPUB ${m.subject} ${hdr.length} ${hdr.length + body.length}\r\n`, "latin1"), hdr, body, Buffer.from("\r\n"));
          } else {
            parts.push(Buffer.from(`PUB ${m.subject} ${body.length}\r\n`, "latin1"), body, Buffer.from("\r\n"));
          }
        }
        parts.push(Buffer.from("PING\r\n"));
        socket.write(Buffer.concat(parts));
      });
    });
  } finally {
    socket.destroy();
  }
}
