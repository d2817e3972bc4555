// Parse a libpq keyword/value DSN ("host=127.0.0.1 port=28842 user=postgres")
// into a node-postgres config. A postgres:// URL is passed through as-is.
const KEYS = { host: 'host', hostaddr: 'host', port: 'port', user: 'user', password: 'password', dbname: 'database' };

export function pgConfig(dsn) {
  if (/^postgres(ql)?:\/\//.test(dsn)) return { connectionString: dsn };
  const config = {};
  const re = /\s*([a-zA-Z_]+)\s*=\s*('((?:[^'\\]|\\.)*)'|\S*)/y;
  let m;
  while (re.lastIndex < dsn.trim().length && (m = re.exec(dsn)) !== null) {
    const value = m[3] !== undefined ? m[3].replace(/\\(.)/g, '$1') : m[2];
    const key = KEYS[m[1]];
    if (key === 'port') config.port = Number(value);
    else if (key) config[key] = value;
    // other keywords (sslmode, connect_timeout, …) are ignored by this example
  }
  return config;
}
