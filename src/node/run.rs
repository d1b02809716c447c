//! The daemon: composes store, audit log, transport, intake, receiving and sending sides, and
//! the local control socket; the only module that spawns long-lived tasks.
//!
//! Start order: keys (refused if readable by others) → store → audit log → inbox recovery
//! (finish what a crash interrupted) → transport bound → tasks spawned → `READY=1` to systemd.
//! Shutdown (SIGTERM/SIGINT → `shutdown` cancelled): intake stops taking new files (the file in
//! hand is finished), peer workers stop launching sends and give in-flight ones `grace` to end
//! (unfinished ones simply stay queued), the endpoint closes, the audit log writes its final
//! signed checkpoint, the store syncs. Everything is bounded by `grace` plus a few seconds, well
//! inside systemd's stop timeout.
//! Must not: hold referral content itself, or expose any network admin interface (control is a
//! Unix socket with mode 0600 in the state directory).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::adapters::audit::{
    Actor, AuditConfig, AuditLog, Event, Justification, Operation, Outcome, SubjectSecret,
};
use crate::adapters::inbox_dir::InboxDir;
use crate::adapters::outbox_dir::{OutboxWatcher, WatchConfig};
use crate::adapters::store::Store;
use crate::adapters::transport::{TlsIdentity, Transport};
use crate::core::referral::csv::CsvLimits;
use crate::core::retry::Backoff;
use crate::crypto::{KemSecretKey, SigningKey};
use crate::node::control;
use crate::node::intake::{Intake, IntakeContext};
use crate::node::receiver::Receiver;
use crate::node::sender::{PeerWorker, SenderContext};
use crate::node::settings::Settings;

/// How long in-flight sends may take to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A failure to start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("key: {0}")]
    Key(#[from] crate::crypto::KeyError),
    #[error("subject secret: {0}")]
    Subject(String),
    #[error("cannot create {0}: {1}")]
    Dir(std::path::PathBuf, std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::adapters::store::StoreError),
    #[error(transparent)]
    Audit(#[from] crate::adapters::audit::AuditError),
    #[error("inbox: {0}")]
    Inbox(String),
    #[error("outbox: {0}")]
    Outbox(String),
    #[error("transport: {0}")]
    Transport(#[from] crate::adapters::transport::TransportError),
}

/// Handles the running daemon keeps for signals and the control socket.
#[derive(Clone)]
pub struct Handles {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub audit: AuditLog,
    pub transport: Transport,
    pub wake: HashMap<crate::core::types::AreaId, Arc<Notify>>,
}

/// Loads the TLS identity named in `settings` (for start and SIGHUP).
pub fn load_tls(
    settings: &Settings,
) -> Result<TlsIdentity, crate::adapters::transport::TransportError> {
    TlsIdentity::load(
        &settings.keys.tls_ca,
        &settings.keys.tls_cert,
        &settings.keys.tls_key,
        settings.keys.tls_crl.as_deref(),
    )
}

/// Opens the audit log as configured (also used by CLI commands when no daemon runs).
pub fn open_audit(
    settings: &Settings,
    signer: Arc<SigningKey>,
) -> Result<AuditLog, crate::adapters::audit::AuditError> {
    AuditLog::open(
        AuditConfig::new(
            settings.paths.audit.clone(),
            settings.area.clone(),
            Justification {
                lawful_basis: settings.audit.lawful_basis.clone(),
                purpose: settings.audit.purpose.clone(),
            },
            settings.audit.checkpoint_interval,
            settings.audit.retention_days,
        ),
        signer,
    )
}

/// Runs the node until `shutdown` is cancelled. `ready` is called once serving.
pub async fn run(
    settings: Settings,
    shutdown: CancellationToken,
    ready: impl FnOnce(),
) -> Result<(), StartError> {
    let settings = Arc::new(settings);
    let s = &settings;
    for d in [
        &s.paths.state,
        &s.paths.audit,
        &s.paths.inbox,
        &s.paths.outbox,
    ] {
        std::fs::create_dir_all(d).map_err(|e| StartError::Dir(d.clone(), e))?;
    }
    let signer = Arc::new(SigningKey::load(&s.keys.signing_key)?);
    let kem = Arc::new(KemSecretKey::load(&s.keys.encryption_key)?);
    let subject = Arc::new(
        SubjectSecret::load(&s.keys.subject_secret)
            .map_err(|e| StartError::Subject(e.to_string()))?,
    );
    if let Some(me) = s.directory.get(&s.area) {
        if !me.signing_keys.contains(&signer.public_key()) {
            warn!("this node's signing key is not listed for its area in the peer directory; peers will refuse its envelopes");
        }
    }
    let store = Store::open(&s.paths.state.join("db"))?;
    let audit = open_audit(s, signer.clone())?;
    let inbox = Arc::new(
        InboxDir::open(s.paths.inbox.clone()).map_err(|e| StartError::Inbox(e.to_string()))?,
    );
    let directory = Arc::new(s.directory.clone());

    let receiver = Arc::new(Receiver::new(
        s.area.clone(),
        directory.clone(),
        signer.clone(),
        kem,
        subject.clone(),
        store.clone(),
        audit.clone(),
        inbox,
        s.limits.open.clone(),
    ));
    receiver.recover().map_err(StartError::Inbox)?;

    let tls = load_tls(s)?;
    let transport = Transport::bind(s.listen, &tls, s.limits.transport.clone())?;
    let watcher = OutboxWatcher::new(WatchConfig {
        dir: s.paths.outbox.clone(),
        settle: s.intake.settle,
        rescan_interval: s.intake.rescan_interval,
        max_file_bytes: s.intake.max_file_bytes,
    })
    .map_err(|e| StartError::Outbox(e.to_string()))?;

    let wake: HashMap<_, _> = directory
        .areas()
        .map(|e| (e.id.clone(), Arc::new(Notify::new())))
        .collect();
    let tracker = TaskTracker::new();
    let handles = Handles {
        settings: settings.clone(),
        store: store.clone(),
        audit: audit.clone(),
        transport: transport.clone(),
        wake: wake.clone(),
    };

    // Receiving side.
    {
        let receiver = receiver.clone();
        let token = shutdown.clone();
        let t = transport.clone();
        tracker.spawn(async move {
            t.serve(
                move |peer, bytes| {
                    let receiver = receiver.clone();
                    async move { receiver.handle(peer, bytes).await }
                },
                token,
            )
            .await
        });
    }
    // Sending side: one worker per area, including this one (local delivery).
    let sender = Arc::new(SenderContext {
        me: s.area.clone(),
        directory: directory.clone(),
        store: store.clone(),
        audit: audit.clone(),
        transport: transport.clone(),
        local: receiver.clone(),
        max_in_flight: s.delivery.max_in_flight_per_peer.get() as usize,
        backoff: Backoff {
            initial: s.delivery.retry_initial,
            max: s.delivery.retry_max,
        },
    });
    for (peer, notify) in &wake {
        let worker = PeerWorker {
            ctx: sender.clone(),
            peer: peer.clone(),
            wake: notify.clone(),
        };
        tracker.spawn(worker.run(shutdown.clone(), SHUTDOWN_GRACE));
    }
    // Intake.
    let intake = Intake {
        ctx: IntakeContext {
            me: s.area.clone(),
            outbox: s.paths.outbox.clone(),
            directory: directory.clone(),
            routing: s.routing.clone(),
            calendar: s.calendar.clone(),
            signer: signer.clone(),
            subject: subject.clone(),
            store: store.clone(),
            audit: audit.clone(),
            wake: wake.clone(),
            csv_limits: CsvLimits {
                max_rows: s.intake.max_csv_rows,
                max_field_bytes: s.intake.max_field_bytes,
            },
        },
        watcher,
    };
    tracker.spawn(intake.run(shutdown.clone()));
    // Housekeeping: checkpoints, non-delivery window, retention.
    tracker.spawn(housekeeping(handles.clone(), shutdown.clone()));
    // Control socket.
    match control::bind(&s.control_socket) {
        Ok(listener) => {
            tracker.spawn(control::serve(listener, handles.clone(), shutdown.clone()));
        }
        Err(e) => warn!(
            "control socket {} unavailable: {e}",
            s.control_socket.display()
        ),
    }
    // SIGHUP: reload the TLS certificate and key for new connections; queued work is untouched.
    {
        let (settings, transport, token) = (settings.clone(), transport.clone(), shutdown.clone());
        tracker.spawn(async move {
            let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
                warn!("cannot watch SIGHUP; certificate reload needs a restart");
                return;
            };
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    Some(()) = hup.recv() => match load_tls(&settings).and_then(|tls| transport.reload(&tls)) {
                        Ok(()) => info!("SIGHUP: TLS certificate and key reloaded"),
                        Err(e) => error!("SIGHUP: reload failed, keeping the current certificate: {e}"),
                    },
                }
            }
        });
    }
    // systemd watchdog: ping at half the configured interval while the runtime is responsive.
    let mut watchdog_usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut watchdog_usec) && watchdog_usec > 0 {
        let token = shutdown.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(watchdog_usec / 2));
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                    }
                }
            }
        });
    }
    tracker.close();
    info!(area = %s.area, listen = %s.listen, "refex serving");
    ready();

    shutdown.cancelled().await;
    info!("shutting down: intake stopped, parking in-flight sends");
    if tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        warn!("some tasks did not stop within the grace period");
    }
    transport.close().await;
    if let Err(e) = audit.close().await {
        error!("final audit checkpoint failed: {e}");
    }
    if let Err(e) = store.close().await {
        error!("final store sync failed: {e}");
    }
    let _ = std::fs::remove_file(&s.control_socket);
    info!("stopped cleanly");
    Ok(())
}

/// Periodic work: signed audit checkpoints, the non-delivery window, retention purges.
async fn housekeeping(h: Handles, shutdown: CancellationToken) {
    let s = h.settings.clone();
    let mut checkpoint = tokio::time::interval(s.audit.checkpoint_interval);
    let mut sweep = tokio::time::interval(Duration::from_secs(5).min(Duration::from_secs(
        s.delivery.non_delivery_after.num_seconds().unsigned_abs(),
    )));
    let mut purge = tokio::time::interval(Duration::from_secs(3600));
    checkpoint.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = checkpoint.tick() => {
                if let Err(e) = h.audit.checkpoint().await {
                    error!("audit checkpoint failed: {e}");
                }
            }
            _ = sweep.tick() => sweep_non_delivered(&h).await,
            _ = purge.tick() => purge_expired(&h).await,
        }
    }
}

async fn sweep_non_delivered(h: &Handles) {
    let cutoff = Utc::now() - h.settings.delivery.non_delivery_after;
    let ids = match h.store.queued_before(cutoff, 1000) {
        Ok(ids) => ids,
        Err(e) => {
            error!("non-delivery sweep failed: {e}");
            return;
        }
    };
    for id in ids {
        let Ok(Some(rec)) = h.store.get(&id) else {
            continue;
        };
        if h.store
            .mark_non_delivered(&id, "non_delivery_window_passed")
            .is_err()
        {
            continue;
        }
        crate::node::counters::count_non_delivered();
        error!(envelope_id = %id, peer = %rec.to, attempts = rec.attempts, "envelope NOT DELIVERED within the non-delivery window; kept for an operator (refex outbox requeue|withdraw)");
        let mut ev = Event::new(Operation::Disclosure, Actor::System, Outcome::Failed)
            .envelope(id)
            .route(&h.settings.area, &rec.to)
            .reason("non_delivered");
        if let Some(k) = &rec.subject_key {
            ev = ev.subject_hex(k);
        }
        if let Err(e) = h.audit.record(ev).await {
            error!("audit record of a non-delivery failed: {e}");
        }
    }
    let _ = h.store.durable().await;
}

async fn purge_expired(h: &Handles) {
    let now = Utc::now();
    let receipts = chrono::Duration::days(i64::from(h.settings.retention.receipts_days));
    match h.store.purge_finished(now - receipts) {
        Ok(gone) => {
            for id in gone {
                let ev = Event::new(Operation::Erasure, Actor::System, Outcome::Ok)
                    .envelope(id)
                    .reason("retention_receipt");
                let _ = h.audit.record(ev).await;
            }
        }
        Err(e) => error!("receipt retention purge failed: {e}"),
    }
    let seen = chrono::Duration::days(i64::from(h.settings.retention.seen_ids_days));
    match h.store.purge_seen(now - seen) {
        Ok(n) if n > 0 => {
            let ev = Event::new(Operation::Erasure, Actor::System, Outcome::Ok)
                .reason(&format!("retention_seen_ids:{n}"));
            let _ = h.audit.record(ev).await;
        }
        Ok(_) => {}
        Err(e) => error!("dedup id retention purge failed: {e}"),
    }
    if let Err(e) = h.audit.purge_expired(now).await {
        error!("audit retention purge failed: {e}");
    }
    let _ = h.store.durable().await;
}
