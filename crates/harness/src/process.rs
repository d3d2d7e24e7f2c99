//! Child processes that cannot outlive the test process.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, so
//! all children are spawned from one thread that lives as long as the process.

#![allow(unsafe_code)] // pre_exec is unsafe; the closure only calls prctl.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("harness-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    // SAFETY: prctl is async-signal-safe and touches no memory
                    // of the parent.
                    unsafe {
                        command.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("spawn harness thread");
        Mutex::new(tx)
    })
}

/// Spawns `command` so that it is killed when this process dies.
pub fn spawn_bound(command: Command) -> std::io::Result<Child> {
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((command, reply_tx))
        .map_err(|_| std::io::Error::other("harness spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("harness spawner thread is gone"))?
}

/// Sends `signal` to the child, ignoring a child that is already gone.
pub fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, signal);
}

/// Kills and reaps a child.
pub fn kill_and_wait(child: &mut Child) {
    signal(child, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

/// Removes directories left behind by test processes that no longer run.
pub fn remove_stale_dirs(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let owner = std::fs::read_to_string(entry.path().join(".owner-pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let Some(pid) = owner else { continue };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
