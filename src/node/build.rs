//! The composition root: opens everything a node needs, once, in order, into one [`Node`]
//! that every component borrows from (no component is handed a bag of positional `Arc`s).
//!
//! Order: directories → keys (refused if readable by others) → store → audit log → inbox.
//! Each step fails with its own [`StartError`]; nothing is opened twice. The network endpoint is
//! bound separately by `run` (in-process tests build a `Node` without one).
//! Must not: spawn tasks (that is `run`), or re-validate settings (they arrive in final types).

use std::collections::BTreeSet;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;
use tracing::warn;

use crate::adapters::audit::{AuditConfig, AuditLog, Justification};
use crate::adapters::inbox_dir::{InboxDir, InboxPublisher};
use crate::adapters::store::Store;
use crate::adapters::transport::{TlsIdentity, TransportError};
use crate::core::referral::csv::CsvLimits;
use crate::core::referral::Context;
use crate::core::retry::Backoff;
use crate::core::routing::RoutingTable;
use crate::core::types::AreaId;
use crate::crypto::directory::Directory;
use crate::crypto::{KemSecretKey, SigningKey, SubjectSecret};
use crate::node::settings::Settings;

/// A failure to start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("key: {0}")]
    Key(#[from] crate::crypto::KeyError),
    #[error("subject secret: {0}")]
    Subject(crate::crypto::KeyError),
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
    #[error("metrics listener {0}: {1}")]
    Metrics(std::net::SocketAddr, std::io::Error),
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// A state or audit directory in a format this binary does not support.
    #[error(transparent)]
    Format(#[from] crate::adapters::format::FormatError),
}

impl StartError {
    /// True for problems an operator fixes in configuration or on disk (exit 78, no restart).
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Format(_))
    }
}

/// One wake-up signal per area's queue: intake and operators notify, the peer worker waits.
pub type Wake = HashMap<AreaId, Arc<Notify>>;

/// The files SIGHUP reloads, swapped in together: the peer directory and the postcode table.
#[derive(Clone, Debug)]
pub struct Peers {
    pub directory: Arc<Directory>,
    pub routing: Arc<RoutingTable>,
}

/// A reload refused: the file and why (nothing was swapped in).
#[derive(Debug, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct ReloadError {
    pub file: std::path::PathBuf,
    pub reason: String,
}

/// Areas added and removed by a reload.
#[derive(Debug, Default)]
pub struct PeersChange {
    pub added: Vec<AreaId>,
    pub removed: Vec<AreaId>,
}

impl Peers {
    /// Reads and validates the directory and postcode files named in `settings`, with the
    /// rules `check-config` applies: this area is listed, every routed area is listed.
    pub fn load(settings: &Settings) -> Result<Self, ReloadError> {
        let read = |file: &std::path::Path| {
            std::fs::read_to_string(file).map_err(|e| ReloadError {
                file: file.to_owned(),
                reason: format!("cannot read: {e}"),
            })
        };
        let (dfile, pfile) = (&settings.directory_file, &settings.postcodes_file);
        let directory = Directory::from_toml(&read(dfile)?).map_err(|e| ReloadError {
            file: dfile.clone(),
            reason: e.join("; "),
        })?;
        if !directory.contains(&settings.area) {
            return Err(ReloadError {
                file: dfile.clone(),
                reason: format!("'{}' (this area) is not listed", settings.area),
            });
        }
        let routing = RoutingTable::from_toml(&read(pfile)?).map_err(|e| ReloadError {
            file: pfile.clone(),
            reason: e.to_string(),
        })?;
        if let Some(t) = routing.areas().find(|a| !directory.contains(a)) {
            return Err(ReloadError {
                file: pfile.clone(),
                reason: format!("routes to area '{t}', which is not in the peer directory"),
            });
        }
        Ok(Self {
            directory: Arc::new(directory),
            routing: Arc::new(routing),
        })
    }
}

/// Everything the components of one running node share.
pub struct Node {
    pub settings: Arc<Settings>,
    pub signer: Arc<SigningKey>,
    pub kem: KemSecretKey,
    /// The HPKE contexts shared by the version-2 envelopes this node seals, per recipient key.
    pub seal_contexts: crate::crypto::SealContexts,
    pub subject: SubjectSecret,
    pub store: Store,
    pub audit: AuditLog,
    pub inbox: Arc<InboxDir>,
    /// Publishes the inbox files of envelopes accepted at once, with one directory sync.
    pub inbox_publisher: InboxPublisher,
    /// The outbox directory's sync that makes intake's deletions durable, shared by the files
    /// removed at once.
    pub outbox_sync: crate::adapters::durable::DirSync,
    /// Wake-ups of the areas known at start; see [`Node::add_wake`] for areas added later.
    pub wake: Wake,
    added_wake: Mutex<Wake>,
    /// Areas that connected to us since their worker last looked (see
    /// [`Node::peer_connected`]).
    connected: Mutex<HashSet<AreaId>>,
    peers: RwLock<Peers>,
    /// Progress of the long-running loops, for the watchdog.
    pub heartbeats: crate::node::heartbeat::Heartbeats,
    /// Slots for envelopes in flight to all peers together (`delivery.max_in_flight_total`,
    /// and a lone busy peer's room up to its own limit); a send holds one until it ends.
    pub send_slots: Arc<crate::node::slots::SendSlots>,
    /// What the running process is made of (connections, tasks), set by `run` once serving;
    /// shown by `status` (see [`RuntimeStats`]).
    pub runtime: std::sync::OnceLock<RuntimeStats>,
}

/// Counts of the running process for `status`: open QUIC connections and live tasks.
pub type RuntimeStats = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

impl Node {
    /// Opens the node described by `settings` (see the module doc for the order).
    pub fn open(settings: Settings) -> Result<Arc<Self>, StartError> {
        let s = &settings;
        for d in [
            &s.paths.state,
            &s.paths.audit,
            &s.paths.inbox,
            &s.paths.outbox,
        ] {
            std::fs::create_dir_all(d).map_err(|e| StartError::Dir(d.clone(), e))?;
        }
        use crate::adapters::format::{check_or_write, AUDIT_FORMAT, STATE_FORMAT};
        check_or_write(&s.paths.state, STATE_FORMAT)?;
        check_or_write(&s.paths.audit, AUDIT_FORMAT)?;
        let signer = Arc::new(SigningKey::load(&s.keys.signing_key)?);
        let kem = KemSecretKey::load(&s.keys.encryption_key)?;
        let subject = SubjectSecret::load(&s.keys.subject_secret).map_err(StartError::Subject)?;
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
        let inbox_publisher =
            InboxPublisher::start(inbox.clone()).map_err(|e| StartError::Inbox(e.to_string()))?;
        let wake = s
            .directory
            .areas()
            .map(|e| (e.id.clone(), Arc::new(Notify::new())))
            .collect();
        let peers = RwLock::new(Peers {
            directory: Arc::new(settings.directory.clone()),
            routing: Arc::new(settings.routing.clone()),
        });
        let send_slots = Arc::new(crate::node::slots::SendSlots::new(
            settings.delivery.max_in_flight_total.get() as usize,
            settings.delivery.max_in_flight_per_peer.get() as usize,
        ));
        Ok(Arc::new(Self {
            outbox_sync: crate::adapters::durable::DirSync::new(&s.paths.outbox),
            send_slots,
            peers,
            added_wake: Mutex::new(HashMap::new()),
            connected: Mutex::new(HashSet::new()),
            settings: Arc::new(settings),
            signer,
            kem,
            seal_contexts: Default::default(),
            subject,
            store,
            audit,
            inbox,
            inbox_publisher,
            wake,
            heartbeats: Default::default(),
            runtime: std::sync::OnceLock::new(),
        }))
    }

    /// The peer directory (every area, with its keys) in use now (SIGHUP may replace it).
    pub fn directory(&self) -> Arc<Directory> {
        self.peers().directory
    }

    /// The directory and postcode table in use now.
    pub fn peers(&self) -> Peers {
        match self.peers.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Swaps in a new directory and postcode table at once; returns the areas added/removed.
    pub fn swap_peers(&self, new: Peers) -> PeersChange {
        let mut guard = match self.peers.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let ids = |d: &Directory| d.areas().map(|e| e.id.clone()).collect::<BTreeSet<_>>();
        let (old, next) = (ids(&guard.directory), ids(&new.directory));
        *guard = new;
        PeersChange {
            added: next.difference(&old).cloned().collect(),
            removed: old.difference(&next).cloned().collect(),
        }
    }

    /// Registers the wake-up of an area added by a reload; `None` if it already has one (its
    /// worker still runs, e.g. an area removed and listed again).
    pub fn add_wake(&self, area: &AreaId) -> Option<Arc<Notify>> {
        if self.wake.contains_key(area) {
            return None;
        }
        let mut added = self.added_wake.lock().unwrap_or_else(|p| p.into_inner());
        if added.contains_key(area) {
            return None;
        }
        let n = Arc::new(Notify::new());
        added.insert(area.clone(), n.clone());
        Some(n)
    }

    /// This node's area.
    pub fn me(&self) -> &AreaId {
        &self.settings.area
    }

    /// Notes that `area` connected to us (authenticated), so it is up: its worker, if backing
    /// off after failed sends, retries at once instead of when the back-off ends (up to
    /// `delivery.retry_max_ms` after the peer came back).
    pub fn peer_connected(&self, area: &AreaId) {
        self.connected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(area.clone());
        self.wake(area);
    }

    /// Whether `area` connected to us since the last call (and forgets it).
    pub fn take_peer_connected(&self, area: &AreaId) -> bool {
        self.connected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(area)
    }

    /// Wakes the worker of `area`'s queue (new or re-queued work).
    pub fn wake(&self, area: &AreaId) {
        if let Some(w) = self.wake.get(area) {
            w.notify_one();
        } else if let Some(w) = self
            .added_wake
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(area)
        {
            w.notify_one();
        }
    }

    /// The classification context of this node's routing table, calendar and directory.
    pub fn with_referral_context<T>(&self, f: impl FnOnce(&Context) -> T) -> T {
        let peers = self.peers();
        let known = |a: &AreaId| peers.directory.contains(a);
        f(&Context {
            routing: &peers.routing,
            calendar: &self.settings.calendar,
            is_known_area: &known,
        })
    }

    /// The CSV bounds of intake.
    pub fn csv_limits(&self) -> CsvLimits {
        CsvLimits {
            max_rows: self.settings.intake.max_csv_rows,
            max_field_bytes: self.settings.intake.max_field_bytes,
        }
    }

    /// The retry schedule of the sending side.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.settings.delivery.retry_initial,
            max: self.settings.delivery.retry_max,
        }
    }
}

/// Loads the TLS identity named in `settings` (at start and on SIGHUP).
pub fn load_tls(settings: &Settings) -> Result<TlsIdentity, TransportError> {
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
    let mut cfg = AuditConfig::new(
        settings.paths.audit.clone(),
        settings.area.clone(),
        Justification {
            lawful_basis: settings.audit.lawful_basis.clone(),
            purpose: settings.audit.purpose.clone(),
        },
        settings.audit.checkpoint_interval,
        settings.audit.retention_days,
    );
    cfg.checkpoint_every_records = settings.audit.checkpoint_every_records;
    // Test failpoint only (see AuditConfig::fail_appends_while); unset in production.
    cfg.fail_appends_while = std::env::var_os("REFEX_AUDIT_EIO_WHILE").map(Into::into);
    AuditLog::open(cfg, signer)
}
