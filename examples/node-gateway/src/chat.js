// The application's streaming chat handler, written against the seam.
import { BillingRefused } from './gateway.js';

/**
 * Stream one completion for `account`, billed under meter 'chat'; tool calls the model makes
 * are billed under 'tool_<name>' through their own gate (bill.tool).
 * Resolves { value: { text, toolResults }, stopped, usage, cost, holdId, ... }.
 */
export function streamChat({ gateway, provider, tools, account, prompt, key, signal, onText = () => {}, estimate }) {
  return gateway.withBilling(account, 'chat', async (bill) => {
    let text = '';
    const toolResults = [];
    for await (const ev of provider.stream(prompt, { signal: bill.signal })) {
      if (ev.type === 'token') {
        text += ev.text;
        onText(ev.text);
        if (!(await bill.progress({ output_tokens: 1 }))) break; // billing said stop
      } else if (ev.type === 'tool_call') {
        try {
          const r = await bill.tool(`tool_${ev.name}`, async (t) => {
            const out = await tools[ev.name](ev.args, { signal: t.signal });
            t.report({ calls: 1 });
            return out;
          });
          toolResults.push({ name: ev.name, ok: true, result: r.value });
        } catch (err) {
          if (!(err instanceof BillingRefused)) throw err;
          toolResults.push({ name: ev.name, ok: false, refused: err.reason }); // the model is told, the chat goes on
        }
      } else if (ev.type === 'usage') {
        bill.report({ input_tokens: ev.input_tokens, output_tokens: ev.output_tokens });
      }
    }
    return { text, toolResults };
  }, {
    key,
    signal,
    estimate,
    properties: { model: provider.model },
    usage: { input_tokens: provider.countTokens(prompt) }, // charged even if billing stops the stream
  });
}
