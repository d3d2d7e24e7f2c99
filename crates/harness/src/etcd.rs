//! A real etcd server (single member) on free loopback ports.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context;

use crate::ports::{START_ATTEMPTS, free_port, is_free, is_port_clash};
use crate::process::{kill_and_wait, signal, spawn_bound};

/// A running (or stopped) etcd member. Killed and removed on drop.
pub struct Etcd {
    name: String,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    extra_args: Vec<String>,
    https: bool,
    /// How the harness itself connects (TLS, auth) for readiness checks.
    connect_options: etcd_client::ConnectOptions,
    child: Option<Child>,
}

/// Options for [`Etcd::start_with`].
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// Extra command-line flags (e.g. TLS flags).
    pub extra_args: Vec<String>,
    /// Client URL scheme: `http` (default) or `https`.
    pub https: bool,
    /// How the harness connects for readiness checks (TLS client config).
    pub connect_options: Option<etcd_client::ConnectOptions>,
}

fn etcd_binary() -> PathBuf {
    std::env::var_os("ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

impl Etcd {
    pub async fn start() -> anyhow::Result<Etcd> {
        Self::start_with(EtcdOptions::default()).await
    }

    pub async fn start_with(options: EtcdOptions) -> anyhow::Result<Etcd> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "eps-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut attempt = 1;
        loop {
            let mut etcd = Etcd {
                name: name.clone(),
                client_port: free_port()?,
                peer_port: free_port()?,
                dir: crate::scratch_dir("etcd")?,
                extra_args: options.extra_args.clone(),
                https: options.https,
                connect_options: options.connect_options.clone().unwrap_or_default(),
                child: None,
            };
            match etcd.launch().await {
                Ok(()) => return Ok(etcd),
                Err(error) if attempt < START_ATTEMPTS && is_port_clash(&error) => attempt += 1,
                Err(error) => return Err(error),
            }
        }
    }

    fn scheme(&self) -> &'static str {
        if self.https { "https" } else { "http" }
    }

    /// The client URL, e.g. `http://127.0.0.1:23790`.
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.client_port)
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            is_free(self.client_port) && is_free(self.peer_port),
            "etcd ports {} / {} are taken by another process",
            self.client_port,
            self.peer_port
        );
        let client_url = self.endpoint();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))?;
        let mut command = Command::new(etcd_binary());
        command
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("{}={peer_url}", self.name))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--logger")
            .arg("zap")
            .arg("--log-level")
            .arg("warn")
            // etcd before 3.4.31/3.5.13 answers progress requests out of
            // order, so the service ignores those answers: an idle watch's
            // checkpoint moves with etcd's periodic notifications, every
            // 10 minutes unless told otherwise (README, "etcd versions").
            .arg("--experimental-watch-progress-notify-interval=250ms")
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = spawn_bound(command).with_context(
            || "cannot start etcd: install Debian's etcd-server package or set ETCD_BIN",
        )?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if self_exited(self.child.as_mut()) {
                anyhow::bail!("etcd exited during start-up\n{}", self.log_tail());
            }
            if self.probe().await? {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("etcd did not become ready in 20 s\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// True once the member serves; an error if the port answers with a
    /// member that is not ours.
    async fn probe(&self) -> anyhow::Result<bool> {
        let connect =
            etcd_client::Client::connect([self.endpoint()], Some(self.connect_options.clone()));
        let Ok(Ok(mut client)) = tokio::time::timeout(Duration::from_secs(2), connect).await else {
            return Ok(false);
        };
        let Ok(members) = client.member_list().await else {
            return Ok(false);
        };
        anyhow::ensure!(
            members.members().iter().any(|m| m.name() == self.name),
            "the server on port {} is not {}",
            self.client_port,
            self.name
        );
        Ok(client.status().await.is_ok())
    }

    /// A client connected to this member.
    pub async fn client(&self) -> anyhow::Result<etcd_client::Client> {
        Ok(
            etcd_client::Client::connect([self.endpoint()], Some(self.connect_options.clone()))
                .await?,
        )
    }

    /// Kills the member (SIGKILL); data stays for [`Etcd::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_wait(&mut child);
        }
    }

    /// Stops the member gracefully (SIGTERM).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    /// Starts the member again on the same ports and data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.launch().await
    }

    /// A backup of the member: its data directory, copied while it is
    /// stopped (it is started again), like `etcdctl snapshot save` plus a
    /// restore with the same member flags.
    pub async fn backup(&mut self) -> anyhow::Result<tempfile::TempDir> {
        self.stop();
        let backup = crate::scratch_dir("etcd-backup")?;
        let copied = Command::new("cp")
            .arg("-a")
            .arg(self.dir.path().join("data"))
            .arg(backup.path().join("data"))
            .status()?;
        anyhow::ensure!(copied.success(), "copying etcd's data directory failed");
        self.launch().await?;
        Ok(backup)
    }

    /// Restores a [`Etcd::backup`]: same member, same ports, the backup's
    /// history (the cluster id stays the same, as with `etcdctl snapshot
    /// restore` and the original flags).
    pub async fn restore(&mut self, backup: &std::path::Path) -> anyhow::Result<()> {
        self.stop();
        let data = self.dir.path().join("data");
        std::fs::remove_dir_all(&data)?;
        let copied = Command::new("cp")
            .arg("-a")
            .arg(backup.join("data"))
            .arg(&data)
            .status()?;
        anyhow::ensure!(copied.success(), "copying the backup back failed");
        self.launch().await
    }

    /// Replaces the member with an empty one on the same ports (a lost data
    /// directory, a new cluster started with the same flags).
    pub async fn wipe(&mut self) -> anyhow::Result<()> {
        self.stop();
        std::fs::remove_dir_all(self.dir.path().join("data"))?;
        self.launch().await
    }

    pub fn is_running(&mut self) -> bool {
        !self_exited(self.child.as_mut())
    }

    /// Compacts the keyspace up to `revision` (physically, like
    /// `etcdctl compact --physical`).
    pub async fn compact(&self, revision: i64) -> anyhow::Result<()> {
        let mut client = self.client().await?;
        client
            .compact(
                revision,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await?;
        Ok(())
    }

    /// The current revision.
    pub async fn revision(&self) -> anyhow::Result<i64> {
        let mut client = self.client().await?;
        let status = client.status().await?;
        Ok(status.header().map_or(0, |h| h.revision()))
    }

    /// The last lines of etcd's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("etcd log tail:\n{tail}")
    }

    /// Directory for files a test wants next to this server (certificates).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

fn self_exited(child: Option<&mut Child>) -> bool {
    match child {
        None => true,
        Some(child) => matches!(child.try_wait(), Ok(Some(_))),
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
