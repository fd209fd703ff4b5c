// The official TypeScript SDK (@anthropic-ai/sdk) as a client of `policy-engine serve`.
//
//   node tests/ts/client.mjs [BASE_URL] < spec.json
//
// spec: {"api_key": "..." (null: ANTHROPIC_API_KEY), "requests": [{"mode": ..., "params": {...Messages params...},
//        "headers": {"x-policy-tenant": "acme", ...}}, ...]}
// modes: `create`        messages.create(...).withResponse()
//        `beta_create`   the same on client.beta.messages (`betas` go as the anthropic-beta header)
//        `stream`        the messages.stream() helper, read to its final message
//        `create_stream` messages.create({stream: true}).withResponse(), read event by event
//        `stream_abort`  the same, left (the request aborted) after the request's `abort_after` events
//        `count_tokens`  messages.countTokens() (its result as "usage": a path the proxy passes on undecided)
// Prints one JSON object: {"sdk": version, "results": [...]}, each result
// {"status", "headers": {x-policy-* of the response}, "usage", "text", "events"} or, for a request
// the SDK raised on, {"status", "headers", "error": {"name", "message", "type"}}.
// Requests run one after the other, in order; no retries (a failure must show).

import Anthropic from "@anthropic-ai/sdk";
import { VERSION } from "@anthropic-ai/sdk/version";

function policyHeaders(headers) {
  const out = {};
  if (!headers) return out;
  for (const [name, value] of headers.entries()) {
    if (name.toLowerCase().startsWith("x-policy-")) out[name.toLowerCase()] = value;
  }
  return out;
}

function textOf(message) {
  return (message.content || []).filter((b) => b.type === "text").map((b) => b.text).join("");
}

async function run(client, request) {
  const options = { headers: request.headers || {} };
  if (request.mode === "create") {
    const { data, response } = await client.messages.create(request.params, options).withResponse();
    return { status: response.status, headers: policyHeaders(response.headers), usage: data.usage, text: textOf(data),
             events: null };
  }
  if (request.mode === "beta_create") {
    const { data, response } = await client.beta.messages.create(request.params, options).withResponse();
    return { status: response.status, headers: policyHeaders(response.headers), usage: data.usage, text: textOf(data),
             events: null };
  }
  if (request.mode === "stream") {
    const stream = client.messages.stream(request.params, options);
    const { response } = await stream.withResponse();
    let events = 0;
    for await (const _event of stream) events += 1;
    const message = await stream.finalMessage();
    return { status: response.status, headers: policyHeaders(response.headers), usage: message.usage,
             text: textOf(message), events };
  }
  if (request.mode === "create_stream") {
    const { data, response } = await client.messages.create({ ...request.params, stream: true }, options).withResponse();
    let events = 0;
    let usage = null;
    let text = "";
    for await (const event of data) {
      events += 1;
      if (event.type === "message_start") usage = { ...event.message.usage };
      else if (event.type === "message_delta") usage = { ...usage, ...event.usage };
      else if (event.type === "content_block_delta" && event.delta.type === "text_delta") text += event.delta.text;
    }
    return { status: response.status, headers: policyHeaders(response.headers), usage, text, events };
  }
  if (request.mode === "stream_abort") {
    // Leave a stream after `abort_after` events: breaking out of the loop aborts the HTTP request.
    const { data, response } = await client.messages.create({ ...request.params, stream: true }, options).withResponse();
    let events = 0;
    for await (const _event of data) {
      events += 1;
      if (events >= request.abort_after) break;
    }
    return { status: response.status, headers: policyHeaders(response.headers), usage: null, text: null, events };
  }
  if (request.mode === "count_tokens") {
    const { model, messages, system } = request.params;
    const { data, response } = await client.messages.countTokens({ model, messages, ...(system ? { system } : {}) },
                                                                 options).withResponse();
    return { status: response.status, headers: policyHeaders(response.headers), usage: data, text: null, events: null };
  }
  throw new Error(`unknown mode ${JSON.stringify(request.mode)}`);
}

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

async function main() {
  // No BASE_URL argument: the SDK's own default, ANTHROPIC_BASE_URL (and ANTHROPIC_API_KEY), as Claude Code reads.
  const baseURL = process.argv[2];
  const spec = JSON.parse(await readStdin());
  const client = new Anthropic({ ...(baseURL ? { baseURL } : {}), ...(spec.api_key ? { apiKey: spec.api_key } : {}),
                                 maxRetries: 0, timeout: 30_000 });
  const results = [];
  for (const request of spec.requests) {
    try {
      results.push(await run(client, request));
    } catch (error) {
      if (!(error instanceof Anthropic.APIError)) throw error;
      results.push({ status: error.status ?? null, headers: policyHeaders(error.headers),
                     error: { name: error.name, message: error.message, type: error.error?.error?.type ?? null } });
    }
  }
  process.stdout.write(JSON.stringify({ sdk: VERSION, results }) + "\n");
}

main().catch((error) => {
  process.stderr.write(`${error?.stack || error}\n`);
  process.exit(1);
});
