//! The `etcd-pg-sync` binary's library: command line (README "Commands"), the `run`
//! service (HTTP endpoints, health monitor, election and sync actors), the
//! operator commands, logging and metrics.
//!
//! Errors are typed in the layers below; here, at the edge, they get
//! context and become exit codes: 0 success, 1 failure (or differences found
//! by `verify`), 2 invalid configuration or usage, 3 a store unreachable or
//! refusing the service.

mod cli;
mod clock;
mod commands;
mod http;
mod logging;
mod monitor;

use std::collections::HashMap;
use std::process::ExitCode;

use clap::Parser;
use eps_core::Config;

pub use cli::Cli;

/// Exit code for an invalid configuration or command line.
pub const EXIT_CONFIG: u8 = 2;

/// Exit code when a store could not be reached or refused the service.
pub const EXIT_UNREACHABLE: u8 = 3;

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = match Config::load(cli.config.as_deref(), &env) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    commands::dispatch(cli.command, config)
}
