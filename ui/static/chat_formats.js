// What each provider's chat API looks like to the playground, and reading its answers as they stream in.

const geminiText = (b) => (b.candidates?.[0]?.content?.parts || []).filter((p) => !p.thought).map((p) => p.text || "").join("");

// What each provider's chat API looks like: where a chat goes, how its token and body are sent, where the text is.
const OPENAI = {
  path: (s) => `/${s.route}/v1/chat/completions`,
  tokenHeader: "Authorization",
  headers: {},
  maxField: "max_completion_tokens", // OpenAI's reasoning models refuse max_tokens
  body(s, messages, stream) {
    const body = { model: s.model, messages: s.system ? [{ role: "system", content: s.system }, ...messages] : messages };
    body[this.maxField] = s.maxTokens;
    if (s.temperature !== null) body.temperature = s.temperature;
    if (stream) body.stream = true;
    return body;
  },
  delta: (e) => e.choices?.[0]?.delta?.content,
  whole: (b) => b.choices?.[0]?.message?.content,
  error: (e) => e.error,
  answerPath: ".choices[0].message.content",
};
export const FORMATS = {
  openai: OPENAI,
  openrouter: { ...OPENAI, maxField: "max_tokens" },
  gemini: {
    path: (s, stream) => `/${s.route}/models/${s.model.replace(/^models\//, "")}:${stream ? "streamGenerateContent?alt=sse" : "generateContent"}`,
    tokenHeader: "x-goog-api-key",
    headers: {},
    body(s, messages) {
      const body = { contents: messages.map((m) => ({ role: m.role === "assistant" ? "model" : "user", parts: [{ text: m.content }] })) };
      if (s.system) body.systemInstruction = { parts: [{ text: s.system }] };
      body.generationConfig = { maxOutputTokens: s.maxTokens };
      if (s.temperature !== null) body.generationConfig.temperature = s.temperature;
      return body;
    },
    delta: geminiText,
    whole: geminiText,
    error: (e) => e.error,
    answerPath: ".candidates[0].content.parts[0].text",
  },
  anthropic: {
    path: (s) => `/${s.route}/v1/messages`,
    tokenHeader: "x-api-key",
    headers: { "anthropic-version": "2023-06-01" },
    body(s, messages, stream) {
      const body = { model: s.model, max_tokens: s.maxTokens };
      if (s.system) body.system = s.system;
      body.messages = messages;
      if (s.temperature !== null) body.temperature = s.temperature;
      if (stream) body.stream = true;
      return body;
    },
    delta: (e) => (e.type === "content_block_delta" ? e.delta?.text : ""),
    whole: (b) => (b.content || []).map((c) => c.text || "").join(""),
    error: (e) => (e.type === "error" ? e.error || {} : null),
    answerPath: ".content[0].text",
  },
};

/** Each data payload of a server-sent event stream, as JSON (named events carry their name in `type` too). */
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, cut).split("\n").filter((line) => line.startsWith("data:"));
      buffer = buffer.slice(cut + 2);
      const data = lines.map((line) => line.slice(5).trimStart()).join("\n");
      if (data && data !== "[DONE]") yield JSON.parse(data);
    }
  }
}

/** Read an answer (a stream, or JSON when the provider sent one), calling onText with each piece of text. */
export async function readAnswer(response, format, onText) {
  if (!(response.headers.get("Content-Type") || "").includes("event-stream")) {
    return onText(format.whole(await response.json()) ?? "");
  }
  for await (const event of sseEvents(response)) {
    const problem = format.error(event);
    if (problem) throw new Error(problem.message || "the provider broke off the answer");
    const text = format.delta(event);
    if (text) onText(text);
  }
}
