//! The command-line interface. The subcommands `run`, `check-config`, `federation init`,
//! `demo`, `status` and `audit verify` are a contract ops scripts and tests rely on.
//!
//! Exit codes: 0 success; 1 a check failed (`audit verify`) or a command failed (`status`: the
//! daemon does not answer); 2 `status` found the node degraded (each problem is listed); 78
//! (EX_CONFIG) the configuration is invalid — every problem is printed, one per line; `check-config`
//! and `run` run the same checks (`node::check`), so a node that passes one starts under the other.
//! Must not: print referral content, except `audit search`, which prints audit records (no
//! personal data by construction) and is itself audited as a consultation.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use chrono::NaiveDate;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::core::types::AreaId;
use crate::crypto::SigningKey;
use crate::edge::logging::{eprint_error, eprint_warning};
use crate::node::control::{self, Request};
use crate::node::settings::Settings;

const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "refex",
    version,
    about = "Referral exchange daemon for PCC victim services"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a configuration and print the effective settings (secrets redacted).
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Development federations.
    Federation {
        #[command(subcommand)]
        cmd: FederationCmd,
    },
    /// Build a local federation, run its daemons, exchange sample referrals, verify, stop.
    Demo {
        /// Keep the federation in this directory instead of a temporary one.
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 17_401)]
        base_port: u16,
        /// The national run instead of the samples: a federation of the first N of the 43
        /// areas (config/areas.toml), every area sending to every other.
        #[arg(long)]
        areas: Option<usize>,
        /// National run: referrals each area sends to each other area (one CSV batch a pair).
        #[arg(long, default_value_t = 50)]
        per_pair: usize,
        /// National run: give up when not every referral has arrived after this many seconds.
        #[arg(long, default_value_t = 900)]
        limit_secs: u64,
    },
    /// Health, queues per peer, last errors, past-due and non-delivered envelopes. Exits 0
    /// healthy, 2 degraded (each problem listed), 1 when the daemon does not answer.
    Status {
        #[arg(long)]
        config: PathBuf,
        /// One JSON object instead of the table (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// The audit log.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Backup and restore of the node's state (store and audit log).
    State {
        #[command(subcommand)]
        cmd: StateCmd,
    },
    /// Operator actions on undelivered envelopes (both audited).
    Outbox {
        #[command(subcommand)]
        cmd: OutboxCmd,
    },
}

#[derive(Subcommand)]
enum FederationCmd {
    /// Create CA, certificates, keys, directory and per-area configs under DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Comma-separated area ids, e.g. west-midlands,greater-manchester,london
        #[arg(long, value_delimiter = ',')]
        areas: Vec<String>,
        #[arg(long, default_value_t = 7401)]
        base_port: u16,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Verify the hash chain and signed checkpoints; exit 1 naming the first bad record.
    Verify {
        #[arg(long)]
        config: PathBuf,
    },
    /// Every record about one person (subject access requests); audited as a consultation.
    Search {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        source_ref: String,
        /// The provider system; without it, every system named in the log is tried.
        #[arg(long)]
        source_system: Option<String>,
        /// Print the raw records (JSON Lines) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Counts for the MoJ/PCC returns (no personal data).
    Report {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        from: NaiveDate,
        #[arg(long)]
        to: NaiveDate,
        /// Group by: day or week.
        #[arg(long, default_value = "week")]
        by: String,
        /// Print CSV instead of a table.
        #[arg(long)]
        csv: bool,
        /// Also write an SVG bar chart to this file.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum StateCmd {
    /// A consistent copy of the store and the audit log into DIR (new or empty), through the
    /// daemon when it runs, directly when it is stopped. Keys are NOT copied unless --with-keys.
    Backup {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        to: PathBuf,
        /// Also copy the signing, encryption and subject key files (keep the backup as safe as the keys).
        #[arg(long)]
        with_keys: bool,
    },
    /// Install a backup (the daemon must be stopped); the current state is moved aside.
    Restore {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        from: PathBuf,
    },
}

#[derive(Subcommand)]
enum OutboxCmd {
    /// Put a non-delivered envelope back in its peer's queue.
    Requeue {
        #[arg(long)]
        config: PathBuf,
        id: String,
    },
    /// Withdraw an undelivered envelope (its payload is erased).
    Withdraw {
        #[arg(long)]
        config: PathBuf,
        id: String,
    },
}

/// Entry point used by `main.rs`.
pub fn main() -> ExitCode {
    // Whatever refex creates (state, audit files, backups, sled's own files) is at most 0750 for
    // directories and 0640 for files, with or without systemd's UMask=0027; key files are 0600
    // and inbox files 0640 by explicit mode.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o027));
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run { config } => run(&config),
        Cmd::CheckConfig { config } => match load_checked(&config) {
            Ok(s) => {
                print!("{}", s.describe());
                println!("configuration OK");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Cmd::Federation {
            cmd:
                FederationCmd::Init {
                    dir,
                    areas,
                    base_port,
                },
        } => {
            let areas: Result<Vec<AreaId>, _> =
                areas.iter().map(|a| AreaId::parse(a.trim())).collect();
            let result = areas.map_err(|e| e.to_string()).and_then(|areas| {
                crate::edge::federation::init(&dir, &areas, base_port).map_err(|e| e.to_string())
            });
            match result {
                Ok(configs) => {
                    for c in configs {
                        println!("{}", c.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Cmd::Demo {
            dir,
            base_port,
            areas,
            per_pair,
            limit_secs,
        } => match crate::edge::demo::run(
            dir,
            base_port,
            areas.map(|areas| crate::edge::national::Options {
                areas,
                per_pair,
                limit: std::time::Duration::from_secs(limit_secs),
            }),
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&format!("demo failed: {e:#}")),
        },
        Cmd::Status { config, json } => {
            let settings = match load(&config) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let resp = match block_on(control::call_within(
                &settings.control_socket,
                &request("status", None, None, None),
                control::ANSWER_LIMIT,
            )) {
                Ok(r) => r,
                Err(e) => {
                    return fail(&format!(
                        "the daemon does not answer at {}: {e}",
                        settings.control_socket.display()
                    ))
                }
            };
            if let Err(e) = ok_field(&resp) {
                return fail(&e);
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&resp).unwrap_or_default()
                );
            } else {
                print!("{}", crate::edge::status::table(&resp));
            }
            if resp["healthy"].as_bool() == Some(true) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EX_DEGRADED)
            }
        }
        Cmd::Outbox { cmd } => {
            let (config, id, action) = match cmd {
                OutboxCmd::Requeue { config, id } => (config, id, "requeue"),
                OutboxCmd::Withdraw { config, id } => (config, id, "withdraw"),
            };
            with_settings(&config, |s| {
                let resp = block_on(control::call_within(
                    &s.control_socket,
                    &request(action, Some(id), None, None),
                    control::ANSWER_LIMIT,
                ))
                .map_err(|e| {
                    format!(
                        "cannot reach the daemon at {}: {e}",
                        s.control_socket.display()
                    )
                })?;
                println!("{resp}");
                ok_field(&resp)
            })
        }
        Cmd::Audit { cmd } => audit(cmd),
        Cmd::State {
            cmd:
                StateCmd::Backup {
                    config,
                    to,
                    with_keys,
                },
        } => with_settings(&config, |s| {
            block_on(crate::edge::state::backup(s, &to, with_keys, &local_user()))
        }),
        Cmd::State {
            cmd: StateCmd::Restore { config, from },
        } => with_settings(&config, |s| crate::edge::state::restore(s, &from)),
    }
}

/// `status`: the daemon answered and lists problems.
const EX_DEGRADED: u8 = 2;

fn fail(msg: &str) -> ExitCode {
    eprintln!("refex: {msg}");
    ExitCode::FAILURE
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("refex: cannot start runtime: {e}");
            std::process::exit(1)
        }
    }
}

/// Loads a configuration, or prints every problem and gives the EX_CONFIG exit code.
fn load(config: &Path) -> Result<Settings, ExitCode> {
    Settings::load(config).map_err(|e| {
        eprint_error(&format!("{}: invalid configuration:", config.display()));
        for line in &e.0 {
            eprint_error(&format!("  {line}"));
        }
        ExitCode::from(EX_CONFIG)
    })
}

/// Loads a configuration and runs every start-up check (`node::check`, the same for
/// `check-config` and `run`): warnings are printed, and any error prints every problem and
/// gives the EX_CONFIG exit code.
fn load_checked(config: &Path) -> Result<Settings, ExitCode> {
    let settings = load(config)?;
    let report = crate::node::check::check(&settings);
    for w in report.warnings() {
        eprint_warning(&format!("{}: {w}", config.display()));
    }
    if !report.is_ok() {
        eprint_error(&format!("{}: invalid configuration:", config.display()));
        for e in report.errors() {
            eprint_error(&format!("  {e}"));
        }
        return Err(ExitCode::from(EX_CONFIG));
    }
    Ok(settings)
}

fn with_settings(config: &Path, f: impl FnOnce(&Settings) -> Result<(), String>) -> ExitCode {
    let settings = match load(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match f(&settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn ok_field(resp: &serde_json::Value) -> Result<(), String> {
    if resp.get("ok").and_then(|v| v.as_bool()) == Some(true) {
        Ok(())
    } else {
        Err(resp
            .get("error")
            .and_then(|v| v.as_str())
            .unwrap_or("request failed")
            .to_owned())
    }
}

/// The local user running a command, for the audit actor.
/// The account running this command, from the kernel (the real uid), never the environment.
fn local_user() -> String {
    control::user_name(rustix::process::getuid().as_raw())
}

fn request(
    cmd: &str,
    id: Option<String>,
    what: Option<String>,
    subject: Option<String>,
) -> Request {
    Request {
        id,
        what,
        subject,
        ..Request::new(cmd)
    }
}

/// Threads for blocking work (file reads, parsing and sealing, inbox writes, directory syncs).
/// tokio's default (512) let a busy node grow to ~70 threads, each with its own malloc arena
/// and stack; the work waiting for one of these threads is short.
const BLOCKING_THREADS: usize = 8;

fn run(config: &Path) -> ExitCode {
    let settings = match load_checked(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    crate::edge::logging::init(settings.telemetry.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start runtime: {e}")),
    };
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
            signals.cancel();
        });
        let ready = || {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        };
        match crate::node::run::run(settings, shutdown, ready).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("refex could not start: {e}");
                if e.is_config() {
                    eprint_error(&format!("refex could not start: {e}"));
                    ExitCode::from(EX_CONFIG)
                } else {
                    ExitCode::FAILURE
                }
            }
        }
    })
}

fn audit(cmd: AuditCmd) -> ExitCode {
    match cmd {
        AuditCmd::Verify { config } => with_settings(&config, |s| {
            let keys = s.directory.signing_keys(&s.area).unwrap_or_default();
            let spinner = crate::edge::progress::spinner("verifying the audit chain");
            let result = crate::adapters::audit::verify(&s.paths.audit, &keys);
            spinner.finish_and_clear();
            match result {
                Ok(report) => {
                    println!("audit log OK: {report}");
                    Ok(())
                }
                Err(failure) => {
                    println!("audit log FAILED: {failure}");
                    Err("audit verification failed".into())
                }
            }
        }),
        AuditCmd::Search {
            config,
            source_ref,
            source_system,
            json,
        } => with_settings(&config, |s| {
            audit_search(s, &source_ref, source_system, json)
        }),
        AuditCmd::Report {
            config,
            from,
            to,
            by,
            csv,
            svg,
        } => with_settings(&config, |s| {
            let by_week = match by.as_str() {
                "week" => true,
                "day" => false,
                other => return Err(format!("--by {other}: expected week or day")),
            };
            let report = crate::adapters::audit::report(&s.paths.audit, from, to, by_week)
                .map_err(|e| e.to_string())?;
            if csv {
                print!("{}", report.to_csv());
            } else {
                print!("{}", report.to_table());
            }
            if let Some(path) = svg {
                std::fs::write(&path, report.to_svg())
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            Ok(())
        }),
    }
}

/// `audit search`: one pass over the log for the subject's key under every system (or the one
/// given); one consultation is recorded per subject key that matched (or, when nothing matched,
/// one for the key of the system given, else one without a subject), before anything is shown.
fn audit_search(
    s: &Settings,
    source_ref: &str,
    source_system: Option<String>,
    json: bool,
) -> Result<(), String> {
    use crate::adapters::audit;
    let secret = audit::SubjectSecret::load(&s.keys.subject_secret).map_err(|e| e.to_string())?;
    let given = source_system.is_some();
    let systems: Vec<String> = match source_system {
        Some(sys) => vec![sys],
        None => audit::source_systems(&s.paths.audit)
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect(),
    };
    let keys: Vec<audit::SubjectKey> = systems
        .iter()
        .map(|sys| secret.key(sys, source_ref))
        .collect();
    let found = audit::search_any(&s.paths.audit, &keys).map_err(|e| e.to_string())?;
    let mut matched: Vec<usize> = found.iter().map(|(i, _)| *i).collect();
    matched.sort_unstable();
    matched.dedup();
    if matched.is_empty() {
        record_consultation(s, "audit_search", given.then(|| keys[0].clone()).as_ref())?;
    }
    for i in &matched {
        record_consultation(s, "audit_search", Some(&keys[*i]))?;
    }
    if json {
        for (_, line) in &found {
            println!("{line}");
        }
    } else {
        print!("{}", search_table(found.iter().map(|(_, l)| l.as_str())));
    }
    eprintln!(
        "{} record(s) for this reference ({} subject key(s) matched)",
        found.len(),
        matched.len()
    );
    Ok(())
}

/// A readable table of audit records: time, operation, from → to, actor, outcome, reason.
fn search_table<'a>(lines: impl Iterator<Item = &'a str>) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "{:<24} {:<13} {:<44} {:<28} {:<8} {}\n",
        "time", "operation", "from -> to", "actor", "outcome", "reason"
    );
    for line in lines {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let f = |k: &str| v[k].as_str().unwrap_or("-").to_owned();
        let route = format!("{} -> {}", f("from"), f("to"));
        let _ = writeln!(
            out,
            "{:<24} {:<13} {:<44} {:<28} {:<8} {}",
            f("time"),
            f("op"),
            route,
            f("actor"),
            f("outcome"),
            f("reason")
        );
    }
    out
}

/// Records a consultation: through the running daemon (the single writer of the audit chain),
/// or, when none runs, by opening the log directly.
fn record_consultation(
    s: &Settings,
    what: &str,
    key: Option<&crate::adapters::audit::SubjectKey>,
) -> Result<(), String> {
    let req = request(
        "consultation",
        None,
        Some(what.into()),
        key.map(ToString::to_string),
    );
    if let Ok(resp) = block_on(control::call(&s.control_socket, &req)) {
        return ok_field(&resp);
    }
    let signer = Arc::new(SigningKey::load(&s.keys.signing_key).map_err(|e| e.to_string())?);
    block_on(async {
        let audit = crate::node::build::open_audit(s, signer).map_err(|e| e.to_string())?;
        let recorded = audit_consultation(&audit, &local_user(), what, key.cloned()).await;
        let closed = audit.close().await.map_err(|e| e.to_string());
        recorded.and(closed)
    })
}

/// Audit helper for CLI commands that read referral data (consultations). Write-ahead: when the
/// record cannot be written the command fails and shows nothing.
async fn audit_consultation(
    audit: &crate::adapters::audit::AuditLog,
    user: &str,
    what: &str,
    subject: Option<crate::adapters::audit::SubjectKey>,
) -> Result<(), String> {
    let mut ev = crate::adapters::audit::Event::new(
        crate::adapters::audit::Operation::Consultation,
        crate::adapters::audit::Actor::User(user.to_owned()),
        crate::adapters::audit::Outcome::Ok,
    )
    .reason(what);
    if let Some(k) = subject {
        ev = ev.subject(k);
    }
    audit
        .record(ev)
        .await
        .map(|_| ())
        .map_err(|e| format!("not shown: the audit record of this consultation failed: {e}"))
}
