// Runs one job through the official client of the API this service follows (npm prodia 1.6.0),
// used as its README shows: createProdia({token, baseUrl}) then prodia.job(params, {inputs, accept}).
//
//   node prodia_job.js spec.json      spec: {baseUrl, token, job, input, output}
//
// Prints one JSON line: {ok, job, bytes} or {ok: false, error: {name, message}}, plus every HTTP
// response the client received ({status, retryAfter}), observed by wrapping fetch without
// changing what the client sends or reads.
"use strict";
const fs = require("fs");
const { createProdia } = require("prodia/v2");

const spec = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const responses = [];
const realFetch = globalThis.fetch;
globalThis.fetch = async (url, init) => {
  const response = await realFetch(url, init);
  responses.push({ status: response.status, retryAfter: response.headers.get("retry-after"), at: Date.now() });
  return response;
};

(async () => {
  let result;
  try {
    const prodia = createProdia({ token: spec.token, baseUrl: spec.baseUrl });
    const input = new Uint8Array(fs.readFileSync(spec.input));
    const job = await prodia.job(spec.job, { inputs: [input], accept: "video/mp4" });
    const output = new Uint8Array(await job.arrayBuffer());
    fs.writeFileSync(spec.output, output);
    result = { ok: true, job: job.job, bytes: output.length };
  } catch (error) {
    result = { ok: false, error: { name: error.constructor.name, message: String(error.message) } };
  }
  result.responses = responses;
  process.stdout.write(JSON.stringify(result) + "\n");
})();
