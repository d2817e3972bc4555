# Shared helpers for bin/ scripts: a throwaway PostgreSQL 15 cluster run as
# the postgres user (PostgreSQL refuses to run as root).
PG_BIN=/usr/lib/postgresql/15/bin
PG_CONFIG=$PG_BIN/pg_config
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '\033[1;34m[%s]\033[0m %s\n' "$(basename "$0")" "$*"; }

# Run a command as the postgres OS user (we are root on these machines).
as_postgres() {
  if [ "$(id -un)" = postgres ]; then "$@"; else sudo -u postgres -- "$@"; fi
}

# start_cluster DIR PORT [CONF]: a fresh cluster in DIR listening on
# 127.0.0.1:PORT and on a socket in /tmp, with CONF appended to its settings.
# Any cluster left in DIR by an earlier run is removed.
start_cluster() {
  local dir=$1 port=$2 extra=${3:-}
  stop_cluster "$dir"
  rm -rf "$dir"
  mkdir -p "$dir"
  chown postgres:postgres "$dir"
  as_postgres "$PG_BIN/initdb" -D "$dir" -U postgres -A trust --no-sync -E UTF8 --locale=C.UTF-8 >/dev/null
  cat >>"$dir/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '/tmp'
max_connections = 100
shared_buffers = 512MB
log_min_messages = warning
$extra
CONF
  as_postgres "$PG_BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w start >/dev/null
}

stop_cluster() {
  local dir=$1
  if [ -f "$dir/postmaster.pid" ]; then
    as_postgres "$PG_BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null 2>&1 || true
  fi
}

# Build the extension and install it into the Debian PostgreSQL 15 tree.
install_extension() {
  local profile_flag=${1:-}
  log "building and installing pg_billing ${profile_flag:+($profile_flag)}"
  (cd "$REPO_ROOT" && cargo pgrx install --pg-config "$PG_CONFIG" $profile_flag >/dev/null)
}

# start_router_deployment DIR PORT SHARDS [CONF]: SHARDS shard clusters (each
# its own cluster in DIR/shardN on PORT+N, database "app", pg_billing and
# router/shard.sql, numbered i - 1) and a router cluster (DIR/router on PORT, database "app",
# router/router.sql and router/functions.sql) whose partitions are spread
# over the shards. The extension must be installed already.
start_router_deployment() {
  local dir=$1 port=$2 shards=$3 extra=${4:-}
  local connstrs=() i
  for i in $(seq 1 "$shards"); do
    start_cluster "$dir/shard$i" $((port + i)) "$extra"
    as_postgres psql -q -X -h /tmp -p $((port + i)) -U postgres -d postgres -c "CREATE DATABASE app" >/dev/null
    as_postgres psql -q -X -h /tmp -p $((port + i)) -U postgres -d app -v ON_ERROR_STOP=1 \
      -c "CREATE EXTENSION pg_billing" -f "$REPO_ROOT/router/shard.sql" \
      -c "SELECT billing_router.number_shard($((i - 1)))" >/dev/null
    connstrs+=("'host=127.0.0.1 port=$((port + i)) dbname=app'")
  done
  start_cluster "$dir/router" "$port" "$extra"
  as_postgres psql -q -X -h /tmp -p "$port" -U postgres -d postgres -c "CREATE DATABASE app" >/dev/null
  as_postgres psql -q -X -h /tmp -p "$port" -U postgres -d app -v ON_ERROR_STOP=1 \
    -f "$REPO_ROOT/router/router.sql" -f "$REPO_ROOT/router/functions.sql" \
    -c "SELECT * FROM billing_router.set_shards(ARRAY[$(IFS=,; echo "${connstrs[*]}")])" >/dev/null
}

stop_router_deployment() {
  local dir=$1 d
  for d in "$dir"/router "$dir"/shard*; do stop_cluster "$d"; done
}
