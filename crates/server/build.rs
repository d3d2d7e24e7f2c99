//! Records the git revision the binary is built from, for the
//! `etcd_pg_sync_build_info` metric: `ETCD_PG_SYNC_GIT_REVISION` when set
//! (the Dockerfile's build argument), else `git rev-parse`, else "unknown".

fn main() {
    println!("cargo:rerun-if-env-changed=ETCD_PG_SYNC_GIT_REVISION");
    if let Ok(given) = std::env::var("ETCD_PG_SYNC_GIT_REVISION") {
        println!("cargo:rustc-env=ETCD_PG_SYNC_GIT_REVISION={given}");
        return;
    }
    let revision = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=ETCD_PG_SYNC_GIT_REVISION={revision}");
    println!("cargo:rerun-if-changed=../../.git/HEAD");
    println!("cargo:rerun-if-changed=../../.git/refs");
}
