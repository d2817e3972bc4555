// What each billing meter costs, in usd_mills (integers: pg_billing amounts are bigint).
// The same meter names are defined in the database by src/billing-setup.sql.
export const UNIT = 'usd_mills';

export const meters = {
  // a chat completion on the fake model: 1 mill per input token, 3 per output token
  chat: {
    estimate: 600,
    cost: (u) => (u.input_tokens ?? 0) * 1 + (u.output_tokens ?? 0) * 3,
    quantity: (u) => (u.input_tokens ?? 0) + (u.output_tokens ?? 0),
  },
  // a web search the model asks for: 40 mills a call
  tool_search: {
    estimate: 50,
    cost: (u) => (u.calls ?? 0) * 40,
    quantity: (u) => u.calls ?? 0,
  },
};
