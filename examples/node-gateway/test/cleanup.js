// node test/cleanup.js RUN: drop the databases a test.sh run left behind (a killed or timed-out file).
import { dropRunDatabases } from './helpers.js';

const run = process.argv[2];
if (!/^[a-z0-9]+$/.test(run ?? '')) {
  console.error('usage: node test/cleanup.js RUN');
  process.exit(2);
}
const dropped = await dropRunDatabases(run);
if (dropped.length) console.error(`cleanup: dropped ${dropped.join(', ')}`);
