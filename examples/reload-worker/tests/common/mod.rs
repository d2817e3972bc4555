//! Test support: a fresh database with pg_billing per test (dropped at the end, also when the
//! test fails), accounts with an auto-reload rule, and workers run as tasks.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use reload_worker::{fake::FakeProvider, run_worker, Error, Stats, WorkerConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls};

/// The card fee of every test: 2.9 % + 30 cents (README, "Top-up quotes").
pub const FEE_SETUP: &str = "SELECT * FROM billing.set_topup_fee('usd', 'domestic', 2.9, 30);
     SELECT billing.define_meter('calls', 'usd_cents', unit_price => 1);";

pub fn server() -> Config {
    let dsn = std::env::var("PG_BILLING_TEST_DSN")
        .expect("set PG_BILLING_TEST_DSN, e.g. \"host=127.0.0.1 port=28843 user=postgres\"");
    dsn.parse()
        .expect("PG_BILLING_TEST_DSN is not a valid connection string")
}

pub async fn connect(cfg: &Config) -> Client {
    let (client, connection) = cfg.connect(NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

pub struct TestDb {
    pub name: String,
    pub cfg: Config,
    pub client: Client,
}

impl TestDb {
    /// A new database `pgb_worker_<tag>_<pid>` with pg_billing, the fee schedule and a meter
    /// `calls` charging 1 usd_cent per unit.
    pub async fn create(tag: &str) -> TestDb {
        let mut admin_cfg = server();
        admin_cfg.dbname("postgres");
        let admin = connect(&admin_cfg).await;
        let name = format!("pgb_worker_{tag}_{}", std::process::id());
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let mut cfg = admin_cfg;
        cfg.dbname(&name);
        let client = connect(&cfg).await;
        client
            .batch_execute("CREATE EXTENSION pg_billing")
            .await
            .unwrap();
        client.batch_execute(FEE_SETUP).await.unwrap();
        TestDb { name, cfg, client }
    }

    /// An account with `balance` cents (a top-up) and a rule: below `threshold`, reload to `reload_to`.
    pub async fn account(&self, account: &str, balance: i64, threshold: i64, reload_to: i64) {
        self.client
            .execute(
                "SELECT * FROM billing.grant($1, 'usd_cents', $2, kind => 'topup', key => 'seed:' || $1)",
                &[&account, &balance],
            )
            .await
            .unwrap();
        self.client
            .execute(
                "SELECT * FROM billing.set_reload($1, 'usd_cents', $2, 'usd', 'domestic', reload_to => $3)",
                &[&account, &threshold, &reload_to],
            )
            .await
            .unwrap();
    }

    /// A debit of `cents` on the `calls` meter; returns available after it.
    pub async fn debit(&self, account: &str, cents: i64, key: &str) -> i64 {
        self.i64(
            "SELECT available FROM billing.ingest($1, 'calls', $2::bigint, key => $3)",
            &[&account, &cents, &key],
        )
        .await
    }

    pub async fn available(&self, account: &str) -> i64 {
        self.i64(
            "SELECT available FROM billing.check($1, 'usd_cents')",
            &[&account],
        )
        .await
    }

    pub async fn i64(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> i64 {
        self.client.query_one(sql, params).await.unwrap().get(0)
    }

    pub async fn text(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Option<String> {
        self.client.query_one(sql, params).await.unwrap().get(0)
    }

    /// billing.verify_ledger(): one row per broken invariant.
    pub async fn ledger_problems(&self) -> Vec<String> {
        let rows = self
            .client
            .query("SELECT v::text FROM billing.verify_ledger() v", &[])
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    }

    pub fn worker(&self, name: &str, lease: Duration, poll_every: Duration) -> WorkerConfig {
        let mut cfg = WorkerConfig::new(self.cfg.clone(), name);
        cfg.lease = lease;
        cfg.poll_every = poll_every;
        cfg
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // on its own thread and runtime: Drop may run inside the test's runtime, or in a panic
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut cfg = server();
                cfg.dbname("postgres");
                let mut last = String::new();
                for _ in 0..5 {
                    match cfg.connect(NoTls).await {
                        Ok((client, connection)) => {
                            tokio::spawn(connection);
                            match client
                                .batch_execute(&format!(
                                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                                ))
                                .await
                            {
                                Ok(()) => return,
                                Err(e) => last = e.to_string(),
                            }
                        }
                        Err(e) => last = e.to_string(),
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                eprintln!("could not drop test database {name}: {last}");
            })
        })
        .join()
        .unwrap();
    }
}

pub struct RunningWorker {
    pub stats: Arc<Stats>,
    stop: oneshot::Sender<()>,
    handle: JoinHandle<Result<(), Error>>,
}

pub fn spawn_worker(cfg: WorkerConfig, provider: Arc<FakeProvider>) -> RunningWorker {
    let stats = cfg.stats.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(run_worker(cfg, provider, async {
        let _ = stopped.await;
    }));
    RunningWorker {
        stats,
        stop,
        handle,
    }
}

impl RunningWorker {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.handle.await.unwrap().unwrap();
    }
}

/// Wait until `check` holds, or fail the test after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for: {what}"
        );
        sleep(Duration::from_millis(50)).await;
    }
}
