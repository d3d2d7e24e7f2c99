//! A TCP proxy in front of a server, for fault injection: pass traffic,
//! cut every connection, black-hole it (connections stay open, nothing
//! flows), or delay it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// Forward everything.
    Pass,
    /// Close every connection and refuse new ones (reset).
    Cut,
    /// Keep connections open but forward nothing (a network partition as
    /// seen by TCP: requests time out instead of failing fast).
    Blackhole,
    /// Forward each chunk after this delay.
    Delay(Duration),
}

/// A running proxy; stops accepting and closes its connections on drop.
pub struct Proxy {
    listen: SocketAddr,
    mode: watch::Sender<FaultMode>,
    accept_task: tokio::task::JoinHandle<()>,
    bytes: Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let listen = listener.local_addr()?;
        let (mode, mode_rx) = watch::channel(FaultMode::Pass);
        let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = bytes.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let mode_rx = mode_rx.clone();
                if *mode_rx.borrow() == FaultMode::Cut {
                    drop(client);
                    continue;
                }
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        _ = pump(client_read, server_write, mode_rx.clone(), counter.clone()) => {}
                        _ = pump(server_read, client_write, mode_rx, counter) => {}
                    }
                });
            }
        });
        Ok(Proxy {
            listen,
            mode,
            accept_task,
            bytes,
        })
    }

    pub fn port(&self) -> u16 {
        self.listen.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    pub fn set(&self, mode: FaultMode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> FaultMode {
        *self.mode.borrow()
    }

    /// Bytes forwarded so far in either direction.
    pub fn bytes_forwarded(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.mode.send_replace(FaultMode::Cut);
        self.accept_task.abort();
    }
}

/// Copies one direction until EOF, an error, or a cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<FaultMode>,
    counter: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if *mode.borrow() == FaultMode::Cut {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() { return; }
                continue;
            }
        };
        // Wait out a black hole (dropping what arrives meanwhile would
        // corrupt the stream; holding it is what a partition looks like).
        loop {
            let current = *mode.borrow();
            match current {
                FaultMode::Cut => return,
                FaultMode::Blackhole => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
                FaultMode::Delay(delay) => {
                    tokio::time::sleep(delay).await;
                    break;
                }
                FaultMode::Pass => break,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
}
