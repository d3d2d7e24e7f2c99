//! The etcd-pg-sync binary as a real child process: started with a config
//! file, stopped with real signals (SIGTERM, SIGKILL, SIGSTOP/SIGCONT).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::Signal;

use crate::ports::free_port;
use crate::process::{kill_and_wait, signal, spawn_bound};

/// What a replica is started with.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The `etcd-pg-sync` binary (`env!("CARGO_BIN_EXE_etcd-pg-sync")`).
    pub binary: PathBuf,
    /// Contents of the TOML config file.
    pub toml: String,
    /// Extra environment (e.g. `ETCD_PG_SYNC__...` overrides).
    pub env: BTreeMap<String, String>,
    /// Arguments after `run` (e.g. `--no-migrate`).
    pub run_args: Vec<String>,
}

/// A running replica. Killed on drop.
pub struct Service {
    pub http: SocketAddr,
    pub node_id: String,
    config: ServiceConfig,
    dir: tempfile::TempDir,
    child: Option<Child>,
    exit: Option<ExitStatus>,
}

impl ServiceConfig {
    /// A config for `node_id` against the given stores, with fast timings
    /// for tests; `extra_toml` is appended (mappings, sections).
    pub fn new(
        binary: impl Into<PathBuf>,
        etcd_endpoint: &str,
        postgres_url: &str,
        node_id: &str,
        extra_toml: &str,
    ) -> Self {
        let toml = format!(
            r#"
[cluster]
name = "test"
node_id = "{node_id}"
lease_ttl_secs = 3

[etcd]
endpoints = ["{etcd_endpoint}"]
request_timeout_ms = 3000
connect_timeout_ms = 2000

[postgres]
url = "{postgres_url}"
pool_size = 6
connect_timeout_ms = 3000

[sync]
poll_interval_ms = 200
progress_interval_ms = 500
watch_stall_timeout_ms = 5000

[retry]
initial_ms = 20
max_ms = 500

[telemetry]
log_format = "json"
log_level = "info"
{extra_toml}
"#
        );
        ServiceConfig {
            binary: binary.into(),
            toml,
            env: BTreeMap::new(),
            run_args: Vec::new(),
        }
    }
}

impl Service {
    /// Starts `etcd-pg-sync run` on a free HTTP port; does not wait.
    pub fn spawn(config: ServiceConfig, node_id: &str) -> anyhow::Result<Service> {
        let port = free_port()?;
        let http: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let dir = crate::scratch_dir("service")?;
        let mut service = Service {
            http,
            node_id: node_id.to_owned(),
            config,
            dir,
            child: None,
            exit: None,
        };
        service.launch()?;
        Ok(service)
    }

    /// Starts it and waits for `/readyz`.
    pub async fn start(config: ServiceConfig, node_id: &str) -> anyhow::Result<Service> {
        let mut service = Self::spawn(config, node_id)?;
        service.wait_ready(Duration::from_secs(30)).await?;
        Ok(service)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let config_path = self.dir.path().join("config.toml");
        std::fs::write(&config_path, &self.config.toml)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut command = Command::new(&self.config.binary);
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(&self.config.run_args)
            .env("ETCD_PG_SYNC__HTTP__LISTEN", self.http.to_string())
            .envs(&self.config.env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(spawn_bound(command).context("starting etcd-pg-sync")?);
        self.exit = None;
        Ok(())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("service.log")
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                anyhow::bail!(
                    "{} exited with {status} before ready\n{}",
                    self.node_id,
                    self.log_tail(40)
                );
            }
            if let Ok((200, _)) = crate::http::get(self.http, "/readyz").await {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "{} not ready after {timeout:?}\n{}",
                    self.node_id,
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET path` on the replica's HTTP endpoint.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        crate::http::get(self.http, path).await
    }

    /// The parsed `/status` document.
    pub async fn status(&self) -> anyhow::Result<String> {
        let (code, body) = self.get("/status").await?;
        anyhow::ensure!(code == 200, "/status answered {code}");
        Ok(body)
    }

    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none()
            && let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.exit = Some(status);
        }
        self.exit
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_exit_status().is_none()
    }

    pub fn signal(&self, sig: Signal) {
        if let Some(child) = self.child.as_ref() {
            signal(child, sig);
        }
    }

    /// SIGKILL: a crash, nothing gets to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_wait(&mut child);
        }
    }

    /// SIGSTOP: a long pause (GC, VM freeze); the lease runs out meanwhile.
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(Signal::SIGCONT);
    }

    /// SIGTERM and wait for the exit, at most `timeout`.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.signal(Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                self.child = None;
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                self.kill();
                anyhow::bail!(
                    "{} did not exit within {timeout:?} of SIGTERM\n{}",
                    self.node_id,
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Changes the environment of the next (re)start.
    pub fn set_env(&mut self, name: &str, value: Option<&str>) {
        match value {
            Some(value) => {
                self.config.env.insert(name.to_owned(), value.to_owned());
            }
            None => {
                self.config.env.remove(name);
            }
        }
    }

    /// Waits for the process to exit by itself (a crash), at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                self.child = None;
                return Ok(status);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} still running after {timeout:?}",
                self.node_id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the same replica again (same config, same HTTP port).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.launch()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let logs = self.logs();
        let all: Vec<&str> = logs.lines().collect();
        format!(
            "--- {} log tail ---\n{}",
            self.node_id,
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(60));
        }
        self.kill();
    }
}

/// Waits until one of `services` reports `role = leader` in `/status`;
/// returns its index.
pub async fn wait_leader(
    services: &[&Service],
    timeout: std::time::Duration,
) -> anyhow::Result<usize> {
    let found = crate::wait_for("a leader", timeout, || async {
        for (i, service) in services.iter().enumerate() {
            if let Ok(body) = service.status().await
                && body.contains("\"role\":\"leader\"")
            {
                return Ok(Some(i));
            }
        }
        Ok(None)
    })
    .await;
    found.map_err(|e| {
        let tails: Vec<String> = services.iter().map(|s| s.log_tail(10)).collect();
        anyhow::anyhow!("{e}\n{}", tails.join("\n---\n"))
    })
}
