//! A real PostgreSQL server in a temporary directory, and fresh databases.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context;

use crate::ports::{START_ATTEMPTS, free_port, is_free, is_port_clash};
use crate::process::{kill_and_wait, signal, spawn_bound};

/// A running (or stopped) PostgreSQL server. Killed and removed on drop.
pub struct Postgres {
    port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    extra_settings: Vec<(String, String)>,
    child: std::sync::Mutex<Option<Child>>,
}

/// How a dedicated server is set up.
#[derive(Debug, Clone, Default)]
pub struct PostgresOptions {
    /// `-c name=value` settings.
    pub settings: Vec<(String, String)>,
    /// Replaces `pg_hba.conf` (the default trusts everything).
    pub hba: Option<String>,
    /// Files written into the data directory, mode 0600.
    pub files: Vec<(String, Vec<u8>)>,
}

/// A fresh database on a server, for one test.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    pub name: String,
    pub port: u16,
}

impl TestDatabase {
    /// `postgres://postgres@127.0.0.1:PORT/NAME`
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, self.name)
    }

    /// The same database reached through another port (a proxy).
    pub fn url_via(&self, port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", port, self.name)
    }

    /// A plain tokio-postgres client, for test assertions and user writes.
    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        connect(&self.url()).await
    }
}

/// Connects with tokio-postgres and drives the connection in the background.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Where the PostgreSQL server binaries are.
pub fn pg_bindir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates
        .pop()
        .context("PostgreSQL server binaries not found: install postgresql or set PG_BIN")
}

/// Runs a command as the `postgres` user when we are root (initdb refuses
/// to run as root).
fn as_server_user(command: &mut Command) -> anyhow::Result<()> {
    if nix::unistd::geteuid().is_root() {
        let user = nix::unistd::User::from_name("postgres")?
            .context("running as root needs a 'postgres' user to run PostgreSQL")?;
        std::os::unix::process::CommandExt::uid(command, user.uid.as_raw());
        std::os::unix::process::CommandExt::gid(command, user.gid.as_raw());
    }
    Ok(())
}

fn chown_to_server_user(path: &Path) -> anyhow::Result<()> {
    if nix::unistd::geteuid().is_root() {
        let user = nix::unistd::User::from_name("postgres")?.context("no 'postgres' user")?;
        nix::unistd::chown(path, Some(user.uid), Some(user.gid))?;
    }
    Ok(())
}

/// An initdb'ed data directory, made once per machine and copied per server
/// (initdb takes about a second, a copy 60 ms).
fn template_dir(bin: &Path) -> anyhow::Result<PathBuf> {
    let version = Command::new(bin.join("postgres"))
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .replace([' ', '(', ')'], "_")
        })
        .unwrap_or_default();
    let template = std::env::temp_dir().join(format!("eps-pg-template-{version}"));
    if template.join("PG_VERSION").exists() {
        return Ok(template);
    }
    let building = std::env::temp_dir().join(format!(
        "eps-pg-template-{version}.building-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&building);
    std::fs::create_dir_all(&building)?;
    chown_to_server_user(&building)?;
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(&building)
        .args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    as_server_user(&mut initdb)?;
    let out = initdb.output().context("running initdb")?;
    anyhow::ensure!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another process may have finished first; either copy is fine.
    if std::fs::rename(&building, &template).is_err() {
        let _ = std::fs::remove_dir_all(&building);
    }
    Ok(template)
}

impl Postgres {
    /// The server shared by all tests of this test binary.
    pub async fn shared() -> anyhow::Result<&'static Postgres> {
        static SHARED: tokio::sync::OnceCell<Postgres> = tokio::sync::OnceCell::const_new();
        SHARED.get_or_try_init(Postgres::start).await
    }

    /// A fresh database on the shared server.
    pub async fn fresh_database() -> anyhow::Result<TestDatabase> {
        Self::shared().await?.create_database().await
    }

    /// A dedicated server (for tests that stop or restart it).
    pub async fn start() -> anyhow::Result<Postgres> {
        Self::start_with(Vec::new()).await
    }

    /// A dedicated server with extra `-c name=value` settings.
    pub async fn start_with(extra_settings: Vec<(String, String)>) -> anyhow::Result<Postgres> {
        Self::start_custom(PostgresOptions {
            settings: extra_settings,
            ..PostgresOptions::default()
        })
        .await
    }

    /// A dedicated server with settings, its own `pg_hba.conf` and files in
    /// its data directory (TLS certificates and keys).
    pub async fn start_custom(options: PostgresOptions) -> anyhow::Result<Postgres> {
        let PostgresOptions {
            settings: extra_settings,
            hba,
            files,
        } = options;
        let bin = pg_bindir()?;
        let template = template_dir(&bin)?;
        let dir = crate::scratch_dir("pg")?;
        chown_to_server_user(dir.path())?;
        let data = dir.path().join("data");
        let status = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&data)
            .status()
            .context("copying the initdb template")?;
        anyhow::ensure!(status.success(), "copying the initdb template failed");
        if let Some(hba) = hba {
            std::fs::write(data.join("pg_hba.conf"), hba)?;
        }
        for (name, contents) in files {
            let path = data.join(&name);
            std::fs::write(&path, contents)?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            chown_to_server_user(&path)?;
        }
        let mut postgres = Postgres {
            port: free_port()?,
            dir,
            bin,
            extra_settings,
            child: std::sync::Mutex::new(None),
        };
        let mut attempt = 1;
        loop {
            match postgres.launch().await {
                Ok(()) => return Ok(postgres),
                Err(error) if attempt < START_ATTEMPTS && is_port_clash(&error) => {
                    attempt += 1;
                    postgres.port = free_port()?;
                }
                Err(error) => return Err(error),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory for files a test wants next to this server (certificates).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    async fn launch(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            is_free(self.port),
            "port {} is taken by another process",
            self.port
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))?;
        let mut command = Command::new(self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "max_connections=300"])
            .args(["-c", "shared_buffers=64MB"]);
        for (name, value) in &self.extra_settings {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        as_server_user(&mut command)?;
        let child = spawn_bound(command).context("starting postgres")?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);

        let url = format!("postgres://postgres@127.0.0.1:{}/postgres", self.port);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if self.exited() {
                anyhow::bail!("postgres exited during start-up\n{}", self.log_tail());
            }
            if let Ok(client) = connect(&url).await
                && client.simple_query("SELECT 1").await.is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("postgres did not become ready\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }

    fn exited(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        match child.as_mut() {
            None => true,
            Some(child) => matches!(child.try_wait(), Ok(Some(_))),
        }
    }

    /// Creates a new, empty database.
    pub async fn create_database(&self) -> anyhow::Result<TestDatabase> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!("test_{}", COUNTER.fetch_add(1, Ordering::Relaxed));
        let admin = connect(&format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            self.port
        ))
        .await?;
        admin
            .simple_query(&format!("CREATE DATABASE {name}"))
            .await
            .context("CREATE DATABASE")?;
        Ok(TestDatabase {
            name,
            port: self.port,
        })
    }

    /// Stops the server: fast shutdown (SIGINT), like `pg_ctl stop -m fast`.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            signal(&child, nix::sys::signal::Signal::SIGINT);
            let _ = child.wait();
        }
    }

    /// Kills the server (SIGKILL on the postmaster); it recovers on restart.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            kill_and_wait(&mut child);
        }
        // Orphaned backends notice the postmaster's death and exit; wait for
        // the port so a restart can bind it.
        for _ in 0..200 {
            if is_free(self.port) {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub async fn restart(&self) -> anyhow::Result<()> {
        self.stop();
        self.launch().await
    }

    /// Starts a stopped server again.
    pub async fn start_again(&self) -> anyhow::Result<()> {
        self.launch().await
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "postgres log tail:\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            kill_and_wait(&mut child);
        }
    }
}
