//! Running a node: every task of the daemon starts here, under one [`TaskTracker`] and one
//! cancellation token, and shutdown drains them under a deadline.
//!
//! Start order: [`Node::open`] (directories, keys, store, audit log, inbox) → inbox recovery
//! and withdraws a crash interrupted completed (finish what a crash interrupted) → transport
//! bound → one store scan for receipts stored before a crash → tasks spawned (receiving side,
//! framing-violation audit, one sender per area, each first completing its stored receipts, intake, housekeeping, metrics listener when configured, control socket and
//! its connections, SIGHUP, watchdog) → `READY=1` to systemd (`RELOADING=1` + `MONOTONIC_USEC`,
//! then `READY=1`, around each SIGHUP; `STOPPING=1` when shutdown starts; `WATCHDOG=1` only
//! while the loops make progress).
//! Shutdown (SIGTERM/SIGINT → `shutdown` cancelled): intake stops taking new files (the file in
//! hand is finished), peer workers stop launching sends and give in-flight ones `grace` to end
//! (unfinished ones simply stay queued), control connections finish their one request, the
//! endpoint closes, the audit log writes its final signed checkpoint, the store syncs.
//! Everything is bounded by `grace` plus a few seconds, well inside systemd's stop timeout.
//! Must not: hold referral content itself, or expose any network admin interface (control is a
//! Unix socket with mode 0660, see `control`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::adapters::metrics_http;
use crate::adapters::outbox_dir::{OutboxWatcher, WatchConfig};
use crate::adapters::store::OutState;
use crate::adapters::transport::{PeerAddr, Transport};
use crate::core::types::AreaId;
use crate::node::build::{load_tls, Node, Peers, StartError};
use crate::node::control;
use crate::node::housekeeping;
use crate::node::intake::Intake;
use crate::node::metrics;
use crate::node::receiver::Receiver;
use crate::node::sender::{PeerWorker, SenderContext};
use crate::node::settings::Settings;

/// How long in-flight sends may take to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the node until `shutdown` is cancelled. `ready` is called once serving.
pub async fn run(
    settings: Settings,
    shutdown: CancellationToken,
    ready: impl FnOnce(),
) -> Result<(), StartError> {
    let node = Node::open(settings)?;
    let s = node.settings.clone();
    let receiver = Arc::new(Receiver::new(node.clone()));
    receiver.recover().map_err(StartError::Inbox)?;
    if let Err(e) = control::complete_withdrawals(&node).await {
        error!("withdraws begun before a crash could not be completed (they stay unsent): {e}");
    }
    let transport = Transport::bind(s.listen, &load_tls(&s)?, s.limits.transport.clone())?;
    transport.know_peers(s.directory.areas().map(|e| e.address));
    let watcher = OutboxWatcher::new(WatchConfig {
        dir: s.paths.outbox.clone(),
        settle: s.intake.settle,
        rescan_interval: s.intake.rescan_interval,
        max_file_bytes: s.intake.max_file_bytes,
    })
    .map_err(|e| StartError::Outbox(e.to_string()))?;
    let metrics_listener = match s.telemetry.metrics_addr {
        Some(addr) => Some(
            metrics_http::bind(addr)
                .await
                .map_err(|e| StartError::Metrics(addr, e))?,
        ),
        None => None,
    };

    let tracker = TaskTracker::new();
    // A peer that connects to us is up: its worker stops backing off (see `sender`).
    {
        let node = node.clone();
        transport.on_peer_connected(move |area| node.peer_connected(area));
    }
    // Receiving side.
    {
        let receiver = receiver.clone();
        let (t, token) = (transport.clone(), shutdown.clone());
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
    // Framing violations the transport refused: audited by the receiver, aggregated.
    if let Some(mut violations) = transport.take_violations() {
        let (receiver, token) = (receiver.clone(), shutdown.clone());
        tracker.spawn(async move {
            loop {
                let v = tokio::select! {
                    _ = token.cancelled() => break,
                    v = violations.recv() => v,
                };
                let Some(v) = v else { break };
                receiver.frame_violation(&v.peer, v.rule).await;
            }
            // Those already queued are still counted before the final flush.
            while let Ok(v) = violations.try_recv() {
                receiver.frame_violation(&v.peer, v.rule).await;
            }
        });
    }
    // Sending side: one worker per area, including this one (local delivery).
    let sender = Arc::new(SenderContext {
        node: node.clone(),
        transport: transport.clone(),
        local: receiver.clone(),
    });
    // One scan for receipts a crash left stored, shared out to the workers (see `PeerWorker`).
    let mut stored = match node.store.in_state(OutState::ReceiptStored) {
        Ok(all) => {
            let mut by_peer: HashMap<AreaId, Vec<_>> = HashMap::new();
            for (id, rec) in all {
                by_peer.entry(rec.to.clone()).or_default().push((id, rec));
            }
            Some(by_peer)
        }
        Err(e) => {
            warn!("cannot scan for stored receipts once; each sender worker will: {e}");
            None
        }
    };
    for (peer, wake) in &node.wake {
        let worker = PeerWorker {
            ctx: sender.clone(),
            peer: peer.clone(),
            wake: wake.clone(),
            stored: stored.as_mut().map(|m| m.remove(peer).unwrap_or_default()),
        };
        tracker.spawn(worker.run(shutdown.clone(), SHUTDOWN_GRACE));
    }
    // Tell every peer we are up: one connection each, so a peer backing off from us after an
    // outage starts sending at once. A peer that is down is simply not reached.
    for entry in s.directory.areas().filter(|e| &e.id != node.me()) {
        let addr = PeerAddr {
            area: entry.id.clone(),
            addr: entry.address,
            server_name: entry.server_name.clone(),
        };
        let (t, token) = (transport.clone(), shutdown.clone());
        tracker.spawn(async move {
            tokio::select! {
                _ = token.cancelled() => {}
                r = t.connect(&addr) => if let Err(e) = r {
                    debug!(peer = %addr.area, "peer not reached at start: {e}");
                }
            }
        });
    }
    let intake = Intake {
        node: node.clone(),
        watcher,
    };
    tracker.spawn(intake.run(shutdown.clone()));
    tracker.spawn(housekeeping::run(node.clone(), shutdown.clone()));
    {
        let (t, tasks) = (transport.clone(), tracker.clone());
        let rt = tokio::runtime::Handle::current();
        let _ = node.runtime.set(Arc::new(move || {
            serde_json::json!({
                "connections": t.open_connections(),
                "tasks": rt.metrics().num_alive_tasks(),
                "tracked_tasks": tasks.len(),
            })
        }));
    }
    // Bound before the control socket: once that exists (tests wait for it), both serve.
    if let Some(listener) = metrics_listener {
        let (node, transport) = (node.clone(), transport.clone());
        let render: metrics_http::Render =
            Arc::new(move || metrics::render(&node, &transport.refusal_totals()));
        info!(addr = ?listener.local_addr().ok(), "metrics served at GET /metrics");
        tracker.spawn(metrics_http::serve(listener, render, shutdown.clone()));
    }
    match control::bind(&s.control_socket) {
        Ok(listener) => {
            tracker.spawn(control::serve(
                listener,
                node.clone(),
                tracker.clone(),
                shutdown.clone(),
            ));
        }
        Err(e) => warn!(
            "control socket {} unavailable: {e}",
            s.control_socket.display()
        ),
    }
    tracker.spawn(reload_on_hangup(
        sender.clone(),
        tracker.clone(),
        shutdown.clone(),
    ));
    {
        let (receiver, token) = (receiver.clone(), shutdown.clone());
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => receiver.flush_refusals(false).await,
                }
            }
        });
    }
    if let Some(interval) = watchdog_interval() {
        tracker.spawn(ping_watchdog(interval, node.clone(), shutdown.clone()));
    }
    info!(area = %s.area, listen = %s.listen, "refex serving");
    ready();

    shutdown.cancelled().await;
    notify(&[sd_notify::NotifyState::Stopping]);
    info!("shutting down: intake stopped, parking in-flight sends");
    // Closed only now: control connections keep being added to the tracker while serving.
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        warn!("some tasks did not stop within the grace period");
    }
    transport.close().await;
    receiver.flush_refusals(true).await;
    if let Err(e) = node.audit.close().await {
        error!("final audit checkpoint failed: {e}");
    }
    if let Err(e) = node.store.close().await {
        error!("final store sync failed: {e}");
    }
    let _ = std::fs::remove_file(&s.control_socket);
    info!("stopped cleanly");
    Ok(())
}

/// SIGHUP: reload the TLS identity, the peer directory and the postcode table, all or nothing
/// (every file is loaded and checked first; one bad file keeps all the old ones, with one
/// ERROR naming it). Queued work is untouched: an added area gets a sender worker, a removed
/// area's queue stays queued (WARN).
async fn reload_on_hangup(
    ctx: Arc<SenderContext>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot watch SIGHUP; certificate and directory reload need a restart");
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(()) = hup.recv() => {
                // systemd's reload protocol: RELOADING=1 with the monotonic time, then READY=1.
                let mut states = vec![sd_notify::NotifyState::Reloading];
                states.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
                notify(&states);
                crate::core::failpoint::hit("sighup_reload");
                reload(&ctx, &tracker, &shutdown);
                notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
}

/// One reload (see [`reload_on_hangup`]).
fn reload(ctx: &Arc<SenderContext>, tracker: &TaskTracker, shutdown: &CancellationToken) {
    let node = &ctx.node;
    let s = &node.settings;
    let loaded = load_tls(s)
        .map_err(|e| format!("{}: {e}", s.keys.tls_cert.display()))
        .and_then(|tls| {
            let peers = Peers::load(s).map_err(|e| e.to_string())?;
            Ok((tls, peers))
        });
    let (tls, peers) = match loaded {
        Ok(v) => v,
        Err(e) => {
            error!("SIGHUP: reload refused, keeping the current certificate, directory and postcodes: {e}");
            return;
        }
    };
    if let Err(e) = ctx.transport.reload(&tls) {
        error!("SIGHUP: reload refused, keeping the current certificate, directory and postcodes: {}: {e}", s.keys.tls_cert.display());
        return;
    }
    if let Some(me) = peers.directory.get(&s.area) {
        if !me.signing_keys.contains(&node.signer.public_key()) {
            warn!("this node's signing key is not listed for its area in the reloaded peer directory; peers will refuse its envelopes");
        }
    }
    ctx.transport
        .know_peers(peers.directory.areas().map(|e| e.address));
    let (areas, routes) = (peers.directory.areas().count(), peers.routing.len());
    let change = node.swap_peers(peers);
    for area in &change.added {
        if let Some(wake) = node.add_wake(area) {
            let worker = PeerWorker {
                ctx: ctx.clone(),
                peer: area.clone(),
                wake,
                stored: None,
            };
            tracker.spawn(worker.run(shutdown.clone(), SHUTDOWN_GRACE));
        }
        node.wake(area);
        info!(area = %area, "SIGHUP: area added to the directory");
    }
    for area in &change.removed {
        warn!(area = %area, "SIGHUP: area removed from the directory; envelopes queued for it stay queued");
    }
    info!(
        areas,
        routes,
        "SIGHUP: TLS certificate and key reloaded; peer directory and postcode table reloaded"
    );
}

/// Tells systemd (when `NOTIFY_SOCKET` is set; a failure to tell it is only logged).
fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        warn!("sd_notify failed: {e}");
    }
}

/// The systemd watchdog interval, when the unit asks for one: `WATCHDOG_USEC`, and
/// `WATCHDOG_PID` (when set) naming this process — libsystemd's `sd_watchdog_enabled` rule.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    let for_us = match std::env::var("WATCHDOG_PID") {
        Ok(pid) => pid.parse::<u32>().ok() == Some(std::process::id()),
        Err(_) => true,
    };
    (for_us && usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the systemd watchdog four times per interval, but only while intake, every sender
/// and the audit writer have beaten within half the interval (see `heartbeat`); a stuck loop
/// is named in the log once, and systemd then restarts the daemon.
async fn ping_watchdog(interval: Duration, node: Arc<Node>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(interval / 4);
    let mut reported = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                let stale = node
                    .heartbeats
                    .stale(interval / 2, &[("audit writer", node.audit.last_beat_ms())]);
                if stale.is_empty() {
                    reported = false;
                    notify(&[sd_notify::NotifyState::Watchdog]);
                } else if !reported {
                    error!("watchdog not pinged: no progress from {}", stale.join(", "));
                    reported = true;
                }
            }
        }
    }
}
