/** The HTTP / OpenAI gateway: its public surface. */
export { Gateway, SERVICE_GATEWAY, type GatewayOptions } from "./server.js";
export { defaultGatewaySettings, validateGatewaySettings, DEFAULT_GATEWAY_PORT, type GatewaySettings } from "./config.js";
export { ApiKeys, API_KEYS_BUCKET, hashApiKey, openApiKeysBucket, putApiKey } from "./auth.js";
export { signCallback, verifyCallback, SIGNATURE_HEADER, STATUS_HEADER, ATTEMPT_HEADER } from "./callbacks.js";
export { HttpError, HTTP_STATUS, errorBody, type GatewayCode, type ErrorBody } from "./errors.js";
export { HTTP_HEADERS } from "./headers.js";
export { HTTP_REQUESTS_BUCKET, type AsyncRecord, type RequestKind } from "./records.js";
export { GatewayMetrics } from "./metrics.js";
