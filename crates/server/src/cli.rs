//! The command line (README "Commands"; a public interface: scripts rely on it).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Keeps etcd and PostgreSQL in sync, both ways.
#[derive(Debug, Parser)]
#[command(name = "etcd-pg-sync", version, about)]
pub struct Cli {
    /// TOML configuration file; every key can be overridden by an
    /// ETCD_PG_SYNC__SECTION__KEY environment variable.
    #[arg(long, global = true, env = "ETCD_PG_SYNC_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a replica: migrate, campaign, sync while leader, serve HTTP.
    Run {
        /// Do not apply the schema at start-up.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Apply the PostgreSQL schema and exit.
    Migrate,
    /// Validate and print the effective configuration (secrets redacted).
    CheckConfig {
        /// Print JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
    /// Ask this host's replica for its health over HTTP (for container
    /// health checks): exit 0 on 200, 1 otherwise.
    Health {
        /// The endpoint: /healthz (the process serves) or /readyz (it is
        /// connected to both stores).
        #[arg(long, default_value = "/healthz")]
        path: String,
    },
    /// Check what the service needs of etcd and PostgreSQL, one line each,
    /// with a fix for each failure (exit 1 when one fails).
    Doctor {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Leader, term, applied revision, lag, outbox depth, conflicts, dead letters.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Compare etcd and PostgreSQL at one etcd revision.
    Verify {
        /// Only keys under this prefix.
        #[arg(long)]
        prefix: Option<String>,
        /// Fix differences by each mapping's policy, through the fenced paths.
        #[arg(long)]
        repair: bool,
        /// Print JSON lines (one per difference, then the summary) instead
        /// of text.
        #[arg(long)]
        json: bool,
    },
    /// The conflicts ledger.
    Conflicts {
        #[command(subcommand)]
        command: ConflictsCommand,
    },
    /// The dead-letter list.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLettersCommand,
    },
    /// An etcd restored from a backup or replaced, while sync is paused on
    /// it (`sync.on_etcd_restore = "pause"`).
    Timeline {
        #[command(subcommand)]
        command: TimelineCommand,
    },
    /// Put every key under a prefix back to its state at an earlier
    /// revision (or time), from the history: prints the changes; writes
    /// them with --apply.
    Rollback {
        /// The keys to put back.
        #[arg(long)]
        prefix: String,
        /// The etcd revision whose state to restore.
        #[arg(long, conflicts_with = "to_time", required_unless_present = "to_time")]
        to_revision: Option<i64>,
        /// Or a time (RFC 3339, e.g. 2026-12-01T14:02:00Z): the state of the
        /// newest revision known to exist by then.
        #[arg(long)]
        to_time: Option<chrono::DateTime<chrono::Utc>>,
        /// Write the changes (as SQL writes of the mirror table, which the
        /// leader sends to etcd like any other).
        #[arg(long)]
        apply: bool,
        /// Print JSON lines (one per change, then the summary).
        #[arg(long)]
        json: bool,
    },
    /// Rebuild an empty etcd (or one prefix) from the PostgreSQL mirror.
    RestoreEtcd {
        /// Only keys under this prefix.
        #[arg(long)]
        prefix: Option<String>,
        /// The state of this etcd revision (from the history) instead of
        /// the newest; the mirror is set back to it too.
        #[arg(long, conflicts_with = "at_time")]
        at_revision: Option<i64>,
        /// Or of a time (RFC 3339): the newest revision known to exist by
        /// then.
        #[arg(long)]
        at_time: Option<chrono::DateTime<chrono::Utc>>,
        /// With --at-revision/--at-time: changes written in PostgreSQL and
        /// still queued for etcd (newer than the state restored) move to
        /// the dead-letter list instead of stopping the restore.
        #[arg(long)]
        set_aside_queued: bool,
        /// Keys that had a lease (their lease ids died with the old etcd)
        /// are restored under one new lease of this many seconds, not kept
        /// alive: they expire on both sides unless their owners write them
        /// again, as they do when they lose a lease.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(i64).range(2..=86_400))]
        leased_keys_ttl: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConflictsCommand {
    /// List conflicts, newest first.
    List {
        /// Include resolved conflicts.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON array instead of text (keys and values as escaped
        /// ASCII, as in the text).
        #[arg(long)]
        json: bool,
    },
    /// Apply one side of a conflict to both stores.
    Resolve {
        /// The conflict's id.
        #[arg(required_unless_present = "timeline_changes")]
        id: Option<i64>,
        /// Every value a new etcd timeline rolled back and that no one has
        /// resolved since (`--take pg` puts them back).
        #[arg(long, conflicts_with = "id")]
        timeline_changes: bool,
        #[arg(long, value_enum)]
        take: TakeSide,
    },
}

#[derive(Debug, Subcommand)]
pub enum TimelineCommand {
    /// Resume sync on the new etcd: `--take etcd` makes PostgreSQL follow
    /// it (every value this rolls back is recorded as a `timeline-change`
    /// conflict); `--take pg` does the same and then puts every rolled-back
    /// value back into etcd through the fenced path.
    Resume {
        #[arg(long, value_enum)]
        take: TakeSide,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TakeSide {
    Etcd,
    Pg,
}

impl From<TakeSide> for eps_core::policy::Side {
    fn from(take: TakeSide) -> Self {
        match take {
            TakeSide::Etcd => eps_core::policy::Side::Etcd,
            TakeSide::Pg => eps_core::policy::Side::Pg,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// List dead letters, newest first.
    List {
        /// Include those already retried.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON array instead of text (keys and values as escaped
        /// ASCII, as in the text).
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back into the outbox.
    Retry {
        /// Dead-letter ids.
        ids: Vec<i64>,
        /// Retry every dead letter not retried yet.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}
