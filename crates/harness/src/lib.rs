//! Test harness shared by every integration test and the benchmark.
//!
//! It starts *real* servers — `etcd` (found on `PATH` or via `ETCD_BIN`) and
//! PostgreSQL (`initdb` + `postgres`, binaries from `PG_BIN`,
//! `pg_config --bindir` or `/usr/lib/postgresql/*/bin`) — on free loopback
//! ports in temporary directories. Every child process is started from one
//! long-lived thread with `PR_SET_PDEATHSIG`, so servers die with the test
//! process even when it panics or is killed; values stop them on drop.
//!
//! One PostgreSQL per test binary ([`Postgres::shared`]) with a fresh
//! database per test keeps the suite fast; tests that restart PostgreSQL or
//! need their own etcd start dedicated ones.

pub mod etcd;
pub mod http;
mod ports;
pub mod postgres;
mod process;
pub mod proxy;
pub mod service;

pub use etcd::Etcd;
pub use ports::free_port;
pub use postgres::{Postgres, PostgresOptions, TestDatabase};
pub use proxy::{FaultMode, Proxy};
pub use service::{Service, ServiceConfig};

/// Waits until `check` returns `Ok(Some(value))`, polling every 20 ms, or
/// fails after `timeout` with the last error seen.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: std::time::Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(match last_error {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow::anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Root of the harness's temporary directories; stale ones of dead test
/// processes are removed the first time it is asked for.
pub fn scratch_root() -> std::path::PathBuf {
    static ROOT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let root = std::env::temp_dir().join("eps-harness");
        let _ = std::fs::create_dir_all(&root);
        process::remove_stale_dirs(&root);
        root
    })
    .clone()
}

/// A new temporary directory under [`scratch_root`], tagged with this
/// process's pid so a later run can clean it up if this one is killed.
pub fn scratch_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{prefix}-{}-", std::process::id()))
        .tempdir_in(scratch_root())?;
    std::fs::write(
        dir.path().join(".owner-pid"),
        std::process::id().to_string(),
    )?;
    Ok(dir)
}
