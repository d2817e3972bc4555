//! reload-worker: `DATABASE_DSN="host=… user=… dbname=…" cargo run --release [worker-name]`
//!
//! Charges through the fake provider (every card accepted): put your provider's client
//! behind `PaymentProvider` for real use. Stops on Ctrl-C after the round in progress.

use std::sync::Arc;

use reload_worker::{fake::FakeProvider, run_worker, WorkerConfig};

#[tokio::main]
async fn main() -> Result<(), reload_worker::Error> {
    let dsn =
        std::env::var("DATABASE_DSN").map_err(|_| "set DATABASE_DSN (libpq key=value or URL)")?;
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| format!("reload-worker-{}", std::process::id()));
    let mut cfg = WorkerConfig::new(dsn.parse()?, name.clone());
    cfg.tenant = std::env::var("BILLING_TENANT").ok();
    eprintln!("[{name}] listening on billing_reload");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    run_worker(cfg, Arc::new(FakeProvider::new()), shutdown).await?;
    eprintln!("[{name}] stopped");
    Ok(())
}
