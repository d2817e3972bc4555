// A fake streaming LLM provider: yields tokens with small delays, honours an AbortSignal,
// may ask for a tool call or fail, and reports token counts at the end (like OpenAI's
// stream_options.include_usage). It records what happened so tests can assert on it.
import { setTimeout as sleep } from 'node:timers/promises';

export class ProviderError extends Error {
  constructor(msg) { super(msg); this.name = 'ProviderError'; }
}

export function fakeProvider({ tokens = 20, inputTokens = 12, delayMs = 3, failAt = null, toolCallAt = null, onToken = null } = {}) {
  const p = {
    model: 'fake-1',
    calls: 0,       // stream() invocations
    delivered: 0,   // tokens handed out
    finished: 0,    // streams that reached their usage report
    aborted: 0,     // streams ended by their AbortSignal
    closed: 0,      // streams the consumer stopped reading (break)
    countTokens: () => inputTokens,
    async *stream(prompt, { signal }) {
      p.calls += 1;
      let done = false;
      try {
        for (let i = 0; i < tokens; i++) {
          await sleep(delayMs, undefined, { signal });
          if (failAt === i) throw new ProviderError(`upstream 502 after ${i} tokens`);
          if (onToken) await onToken(i, p);
          if (toolCallAt === i) yield { type: 'tool_call', name: 'search', args: { q: prompt } };
          p.delivered += 1;
          yield { type: 'token', text: `t${i} ` };
        }
        yield { type: 'usage', input_tokens: inputTokens, output_tokens: tokens };
        done = true;
        p.finished += 1;
      } finally {
        if (signal.aborted) p.aborted += 1;
        else if (!done) p.closed += 1;
      }
    },
  };
  return p;
}
