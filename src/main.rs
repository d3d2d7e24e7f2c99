//! The `etcd-pg-sync` binary: everything lives in `eps-server`.

fn main() -> std::process::ExitCode {
    eps_server::main()
}
