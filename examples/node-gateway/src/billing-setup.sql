-- The meters the gateway settles under (no price in the database: the gateway passes each
-- call's cost, computed from the provider's token counts by src/meters.js).
SELECT billing.define_meter('chat', 'usd_mills', description => 'chat completions (tokens)');
SELECT billing.define_meter('tool_search', 'usd_mills', description => 'search tool calls');
