//! One module per command group.

mod doctor;
mod ops;
mod repair;
mod run;

use std::process::ExitCode;

use eps_core::Config;

use crate::cli::Command;

pub fn dispatch(command: Command, config: Config) -> ExitCode {
    match command {
        Command::Run { no_migrate } => run::run(config, no_migrate),
        Command::CheckConfig { json } => ops::check_config(&config, json),
        Command::Health { path } => ops::health(&config, &path),
        other => ops::run_blocking(other, config),
    }
}
