// The official JavaScript clients, ollama-js and openai-node, against one URL.
// Usage: node clients.mjs NODE_MODULES_DIR BASE_URL
// Each non-streaming call runs in turn; one JSON line per call on stdout:
// {"call": ..., "rejected": true|false, "error": message, "cause": message, "result": ...}
import { createRequire } from "node:module";
import path from "node:path";

const [modules, base] = process.argv.slice(2);
const require = createRequire(path.join(path.resolve(modules), "noop.js"));
const { Ollama } = require("ollama");
const OpenAI = require("openai");

const ollama = new Ollama({ host: base });
const openai = new OpenAI({ baseURL: base + "/v1", apiKey: "unused", maxRetries: 0, timeout: 10000 });
const model = "llama3.2";
const messages = [{ role: "user", content: "hello there" }];

const calls = {
  "ollama.generate": () => ollama.generate({ model, prompt: "why is the sky blue", stream: false }),
  "ollama.chat": () => ollama.chat({ model, messages, stream: false }),
  "openai.chat.completions.create": () => openai.chat.completions.create({ model, messages }),
};

for (const [call, run] of Object.entries(calls)) {
  try {
    const result = await run();
    console.log(JSON.stringify({ call, rejected: false, result }));
  } catch (err) {
    const cause = err?.cause ? String(err.cause?.cause ?? err.cause) : "";
    console.log(JSON.stringify({ call, rejected: true, error: String(err?.message ?? err), cause }));
  }
}
