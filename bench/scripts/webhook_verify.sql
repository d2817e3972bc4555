\set k random(1, 300000)
SELECT v.valid FROM bench.hooks h, billing.verify_webhook('stripe', 'whsec_bench', h.headers, h.body, tolerance_seconds => 86400) v WHERE h.id = :k;
