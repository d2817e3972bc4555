\set k random(1, 300000)
SELECT r.status FROM bench.hooks h, billing.receive_webhook('bench', h.headers, h.body) r WHERE h.id = :k;
