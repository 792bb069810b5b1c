/**
 * The base of the project's typed errors: an Error with a `code` from a closed set (most are
 * docs/protocol.md's error codes). Each subclass names itself and narrows the code.
 */
export class CodedError<C extends string> extends Error {
  constructor(
    readonly code: C,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}
