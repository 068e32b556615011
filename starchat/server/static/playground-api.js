// The page's side of our OpenAI-compatible API: streamed chat completions and readable errors.

/** A failure to show to the user: a short title, the server's own words, and what to do. */
export class PlaygroundError extends Error {
  constructor(title, detail, { status = null, hint = "" } = {}) {
    super(`${title}: ${detail}`);
    this.title = title;
    this.detail = detail;
    this.status = status;
    this.hint = hint;
  }
}

/** The message of an error body: OpenAI's {"error": {...}}, TGI's {"error": "..."}, FastAPI's {"detail"}. */
function describeErrorBody(body, fallback) {
  const error = body && typeof body === "object" && "error" in body ? body.error : body;
  if (typeof error === "string") return { message: error, code: "", param: "" };
  if (error && typeof error === "object") {
    if (typeof error.message === "string") {
      return { message: error.message, code: String(error.code ?? error.type ?? ""), param: String(error.param ?? "") };
    }
    if ("detail" in error) {
      const detail = error.detail;
      return { message: typeof detail === "string" ? detail : JSON.stringify(detail), code: "", param: "" };
    }
  }
  return { message: fallback, code: "", param: "" };
}

export async function errorFromResponse(response) {
  const text = await response.text().catch(() => "");
  let parsed = { message: text.slice(0, 600) || response.statusText || "no details", code: "", param: "" };
  try {
    parsed = describeErrorBody(JSON.parse(text), parsed.message);
  } catch (error) {
    // not JSON: keep the text
  }
  const status = response.status;
  const { message, code, param } = parsed;
  if (status === 401) {
    return new PlaygroundError("Authentication failed (401)", message, {
      status,
      hint: "The server needs a valid API key: enter it in the dialog, then press Regenerate.",
    });
  }
  if (status === 429) {
    const retryAfter = response.headers.get("Retry-After");
    const wait = retryAfter ? `Try again in ${retryAfter} s.` : "Try again in a moment.";
    return new PlaygroundError("Server busy: too many requests (429)", message, { status, hint: `The server is at capacity. ${wait}` });
  }
  if (status === 413) {
    return new PlaygroundError("Request too large (413)", message, { status, hint: "Shorten the message or clear the chat." });
  }
  if (status === 400 && /^max_(new_|completion_)?tokens/.test(`${param}`) && /fit|context|exceed/i.test(message)) {
    return new PlaygroundError("Too many new tokens for the context (400)", message, {
      status,
      hint: "Lower Max new tokens, or clear the chat to make room.",
    });
  }
  if (status === 400 && /context|too long|too many tokens|exceed|not fit|more than the limit/i.test(`${code} ${message}`)) {
    return new PlaygroundError("Prompt too long (400)", message, {
      status,
      hint: "The conversation does not fit the model's context: clear the chat or shorten the message.",
    });
  }
  if (status === 400 || status === 422) {
    return new PlaygroundError(`Invalid request (${status})`, message, { status, hint: "Check the generation settings." });
  }
  if (status >= 500) return new PlaygroundError(`Server error (${status})`, message, { status });
  return new PlaygroundError(`Request failed (${status})`, message, { status });
}

export function toPlaygroundError(error) {
  if (error instanceof PlaygroundError) return error;
  if (error instanceof TypeError) {
    return new PlaygroundError("Could not reach the server", error.message, { hint: "Is `starchat serve` still running?" });
  }
  return new PlaygroundError("Something went wrong", String(error && error.message ? error.message : error));
}

/** The `data:` payloads of a Server-Sent Events response, one per event. */
async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let dataLines = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, "");
        buffer = buffer.slice(end + 1);
        if (line === "") {
          if (dataLines.length) yield dataLines.join("\n");
          dataLines = [];
        } else if (line.startsWith("data:")) {
          dataLines.push(line.slice(5).replace(/^ /, ""));
        } // comments (":") and other fields are ignored
      }
    }
    if (dataLines.length) yield dataLines.join("\n");
  } finally {
    reader.cancel().catch(() => {});
  }
}

/**
 * POST a chat completion with `stream: true` and yield what each chunk brings:
 * {content, finishReason, completionTokens}. Throws PlaygroundError for an error status, an
 * error event in the stream, or a stream that ends without `data: [DONE]`; aborting `signal`
 * (Stop) closes the connection, which makes the server cancel the generation.
 */
export async function* streamChatCompletion(body, headers, signal) {
  const response = await fetch("v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...headers },
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await errorFromResponse(response);
  for await (const data of serverSentEvents(response)) {
    if (data === "[DONE]") return;
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch (error) {
      throw new PlaygroundError("Unreadable reply from the server", data.slice(0, 300));
    }
    if (chunk.error) {
      const { message } = describeErrorBody(chunk, "the server ended the reply with an error");
      throw new PlaygroundError("The server stopped the reply", message);
    }
    const choice = (chunk.choices && chunk.choices[0]) || {};
    const usage = chunk.usage && Number.isFinite(chunk.usage.completion_tokens) ? chunk.usage.completion_tokens : null;
    yield {
      content: (choice.delta && choice.delta.content) || "",
      finishReason: choice.finish_reason || null,
      completionTokens: usage,
    };
  }
  throw new PlaygroundError("The reply ended early", "The server closed the stream before it was complete.");
}
