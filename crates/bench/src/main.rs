//! `eps-bench`: measures etcd-pg-sync against raw etcd and PostgreSQL on
//! the same stores, in the same run (the machine is shared and noisy:
//! compare ratios, not absolute figures). Prints one JSON object per
//! scenario on stdout and writes `bench/RESULTS.md`.
//!
//! `cargo run --release -p eps-bench -- all [--quick] [--large]`

mod probe;
mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "eps-bench",
    about = "etcd-pg-sync benchmarks against raw baselines"
)]
struct Args {
    /// Scenario to run: all, etcd-to-pg-live, etcd-to-pg-catchup,
    /// conflict-catchup, pg-to-etcd, pg-txn-to-etcd, latency-1k, latency-5k, snapshot, failover,
    /// vs-make-mirror, long-run-memory, history-queries, pg-backlog-drain.
    scenario: String,
    /// The service binary to measure (default: `etcd-pg-sync` next to this
    /// one); another build's binary gives before/after figures.
    #[arg(long)]
    service: Option<PathBuf>,
    /// Small sizes: every scenario in a few minutes on 2 cores.
    #[arg(long)]
    quick: bool,
    /// Include the 1,000,000-key snapshot.
    #[arg(long)]
    large: bool,
    /// Where to write the Markdown table (default bench/RESULTS.md).
    #[arg(long)]
    results: Option<PathBuf>,
    /// Load `pg_stat_statements` into the scenarios' PostgreSQL and print,
    /// when a scenario ends, the statements that took the most server time.
    #[arg(long)]
    profile_sql: bool,
}

/// Sizes for a run.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub quick: bool,
    pub large: bool,
    pub live_secs: u64,
    pub live_clients: usize,
    pub catchup_changes: usize,
    pub pg_writes: usize,
    pub latency_secs: u64,
    pub snapshot_keys: [usize; 2],
}

impl Sizes {
    fn new(quick: bool, large: bool) -> Sizes {
        if quick {
            Sizes {
                quick,
                large,
                live_secs: 5,
                live_clients: 32,
                catchup_changes: 20_000,
                pg_writes: 10_000,
                latency_secs: 5,
                snapshot_keys: [10_000, 50_000],
            }
        } else {
            Sizes {
                quick,
                large,
                live_secs: 15,
                live_clients: 64,
                catchup_changes: 100_000,
                pg_writes: 50_000,
                latency_secs: 20,
                snapshot_keys: [20_000, 100_000],
            }
        }
    }
}

/// One scenario's result, as printed and tabulated.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub scenario: String,
    pub parameters: serde_json::Value,
    pub figures: serde_json::Value,
    pub baseline: serde_json::Value,
    pub ratio: Option<f64>,
    pub goal: String,
    /// One line for the Markdown table.
    #[serde(skip)]
    pub summary: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sizes = Sizes::new(args.quick, args.large);
    scenarios::PROFILE_SQL.store(args.profile_sql, std::sync::atomic::Ordering::Relaxed);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let binary = args
        .service
        .clone()
        .or_else(|| {
            std::env::current_exe()
                .ok()?
                .parent()
                .map(|dir| dir.join("etcd-pg-sync"))
        })
        .filter(|p| p.exists())
        .ok_or_else(|| {
            anyhow::anyhow!("build the service first: cargo build --release -p etcd-pg-sync")
        })?;
    let names: Vec<&str> = match args.scenario.as_str() {
        "all" => scenarios::ALL.to_vec(),
        one => vec![one],
    };
    let mut outcomes = Vec::new();
    for name in names {
        eprintln!("== {name}");
        let outcome = runtime.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(1800),
                scenarios::run(name, &binary, sizes),
            )
            .await
        });
        match outcome {
            Ok(Ok(outcome)) => {
                println!("{}", serde_json::to_string(&outcome)?);
                outcomes.push(outcome);
            }
            Ok(Err(error)) => eprintln!("{name} failed: {error:#}"),
            Err(_) => eprintln!("{name} timed out"),
        }
    }
    let path = args
        .results
        .unwrap_or_else(|| PathBuf::from("bench/RESULTS.md"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A scenario run alone adds a dated section (none when it failed);
    // `all` writes the file anew.
    if args.scenario != "all" && outcomes.is_empty() {
        eprintln!("nothing added to {}", path.display());
    } else if args.scenario != "all" && path.exists() {
        let mut text = std::fs::read_to_string(&path)?;
        text.push_str(&section(&outcomes, sizes));
        std::fs::write(&path, text)?;
        eprintln!("results added to {}", path.display());
    } else {
        std::fs::write(&path, markdown(&outcomes, sizes))?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

/// The date and time now, UTC.
fn now_utc() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The results table of `outcomes`.
fn table(outcomes: &[Outcome]) -> String {
    let mut text = String::from(
        "| scenario | result | baseline | ratio | goal |\n| --- | --- | --- | --- | --- |\n",
    );
    for outcome in outcomes {
        text.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            outcome.scenario,
            outcome.summary,
            summarize_baseline(&outcome.baseline),
            outcome.ratio.map_or("—".into(), |r| format!("{r:.2}")),
            outcome.goal
        ));
    }
    text
}

/// A section for scenarios run alone, appended to the results.
fn section(outcomes: &[Outcome], sizes: Sizes) -> String {
    let names: Vec<&str> = outcomes.iter().map(|o| o.scenario.as_str()).collect();
    format!(
        "\n## {}: {} ({} sizes, run alone)\n\n{}",
        now_utc(),
        names.join(", "),
        if sizes.quick { "quick" } else { "full" },
        table(outcomes)
    )
}

fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    format!("{cores} cores, {memory_gib:.0} GiB")
}

fn markdown(outcomes: &[Outcome], sizes: Sizes) -> String {
    let date = now_utc();
    let mut text = format!(
        "# Benchmark results\n\nRun {date} on {} ({} sizes), etcd {} and PostgreSQL with default durability, the service in release mode, all on the same machine.\n\
         Each figure has its baseline measured on the same stores in the same run; compare the ratios, not the absolute figures (the machine is shared and noisy).\n\
         Produced by `cargo run --release -p eps-bench -- all{}` (`just bench`; `just bench-quick` for the quick sizes).\n\n",
        machine(),
        if sizes.quick { "quick" } else { "full" },
        etcd_version(),
        if sizes.quick { " --quick" } else { "" },
    );
    text.push_str(&table(outcomes));
    text.push_str("\nThe JSON objects printed by the run carry every figure and parameter.\n");
    text
}

fn summarize_baseline(baseline: &serde_json::Value) -> String {
    baseline
        .get("summary")
        .and_then(|s| s.as_str())
        .unwrap_or("—")
        .to_owned()
}

fn etcd_version() -> String {
    std::process::Command::new(std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into()))
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.replace("etcd Version: ", ""))
        })
        .unwrap_or_default()
}
