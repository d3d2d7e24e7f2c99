//! Free loopback ports. A port is handed out once per process, and checked
//! free by binding it (a server started on a busy port can fail silently,
//! and a test then talks to someone else's server).

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

pub fn free_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        drop(listener);
        let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if handed.get_or_insert_with(HashSet::new).insert(port) {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port found")
}

pub fn is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Whether a server failed to start because another process took its port
/// between our choice and its bind (a client's ephemeral port, say): the
/// caller retries with fresh ports.
pub fn is_port_clash(error: &anyhow::Error) -> bool {
    let text = format!("{error:#}").to_lowercase();
    text.contains("address already in use") || text.contains("taken by another process")
}

/// Start-up attempts on fresh ports before a clash is reported.
pub const START_ATTEMPTS: u32 = 5;
