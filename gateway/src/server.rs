//! Starting, running and stopping the server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use qun_chat_core::{ConnId, Groups, OutboxLimits};
use qun_storage::scylla_store::ScyllaStore;
use qun_storage::stats::CommitStats;
use qun_storage::{Coalescing, CoalescingStats, FjallConfig, FjallStore, StorageError, Store};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::auth::{KeyError, TokenKey};
use crate::config::Config;
use crate::metrics::Metrics;

/// Connections the kernel queues for `accept` (capped by
/// `net.core.somaxconn`). A reconnect storm, every phone of a big group
/// coming back at once after a deploy or a network blip, overflowed
/// tokio's default of 1,024: the overflow waited a SYN retransmit, a full
/// second (docs/benchmarks.md, "Flash sale and history").
const ACCEPT_BACKLOG: u32 = 8192;

/// A TCP listener on `addr` with [`ACCEPT_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restart can bind at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// The sockets the server serves. Bind them first (tests bind port 0 and
/// read the addresses back), then hand them to [`run`].
#[derive(Debug)]
pub struct Listeners {
    /// WebSocket listener.
    pub ws: TcpListener,
    /// HTTP listener.
    pub http: TcpListener,
    /// QUIC endpoint (UDP) with its certificate.
    pub quic: crate::quic::QuicListener,
}

impl Listeners {
    /// Binds the addresses of `config`.
    ///
    /// # Errors
    /// [`ServerError::Bind`] naming the address that could not be bound,
    /// [`ServerError::Quic`] when the QUIC certificate or socket is wrong.
    pub async fn bind(config: &Config) -> Result<Self, ServerError> {
        let bind =
            |addr: SocketAddr| listen(addr).map_err(|source| ServerError::Bind { addr, source });
        Ok(Self {
            ws: bind(config.ws_listen)?,
            http: bind(config.http_listen)?,
            quic: crate::quic::QuicListener::bind(config)?,
        })
    }

    /// The WebSocket address actually bound.
    ///
    /// # Errors
    /// The OS error, if the socket has none.
    pub fn ws_addr(&self) -> std::io::Result<SocketAddr> {
        self.ws.local_addr()
    }

    /// The QUIC (UDP) address actually bound.
    ///
    /// # Errors
    /// The OS error, if the socket has none.
    pub fn quic_addr(&self) -> std::io::Result<SocketAddr> {
        self.quic.local_addr()
    }

    /// The lowercase hex SHA-256 of the QUIC certificate, for clients to pin.
    pub fn quic_fingerprint(&self) -> &str {
        &self.quic.fingerprint
    }

    /// The HTTP address actually bound.
    ///
    /// # Errors
    /// The OS error, if the socket has none.
    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.http.local_addr()
    }
}

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// An address could not be bound (in use, or not local).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The store could not be opened or flushed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The QUIC listener could not be set up (certificate or UDP socket).
    #[error("quic: {0}")]
    Quic(#[from] crate::quic::QuicError),
    /// The token key could not be loaded or created.
    #[error("token key: {0}")]
    Key(#[from] KeyError),
    /// The configuration cannot be used as it is (checked again at start).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// The counters of the store [`open_store`] opened, for `/metrics`.
#[derive(Debug, Default)]
pub struct StoreCounters {
    /// History page reads of the cluster store, shared or sent.
    pub page_reads: Option<Arc<CoalescingStats>>,
    /// Group commits and time to durability, of either store.
    pub commits: Option<Arc<CommitStats>>,
}

/// Opens the store `config` names: the embedded one in `data_dir`, or the
/// cluster (wrapped so that concurrent reads of one history page share a
/// query), with its counters.
///
/// # Errors
/// [`ServerError::Storage`] when the store cannot be opened or reached (a
/// missing cluster schema says to run `qun migrate`),
/// [`ServerError::Config`] for unusable cluster settings.
pub async fn open_store(config: &Config) -> Result<(Arc<dyn Store>, StoreCounters), ServerError> {
    if config.uses_scylla() {
        let cluster = ScyllaStore::connect(config.scylla()?).await?;
        let commits = Some(cluster.commit_stats());
        let store = Coalescing::new(cluster);
        let counters = StoreCounters {
            page_reads: Some(store.stats()),
            commits,
        };
        return Ok((Arc::new(store), counters));
    }
    let mut store_config = FjallConfig::new(&config.data_dir);
    store_config.fsync = config.fsync;
    store_config.commit_window = std::time::Duration::from_micros(config.store_commit_window_us);
    store_config.writer_nice = config.store_writer_nice;
    if config.store_partitions > 0 {
        store_config.partitions = config.store_partitions;
    }
    let store = FjallStore::open(store_config)?;
    let counters = StoreCounters {
        page_reads: None,
        commits: Some(store.commit_stats()),
    };
    Ok((Arc::new(store), counters))
}

/// State shared by every task of one server.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) groups: Groups,
    pub(crate) key: TokenKey,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
    pub(crate) outbox_limits: OutboxLimits,
    next_conn: AtomicU64,
    /// One permit per open connection, WebSocket or QUIC.
    permits: Arc<Semaphore>,
    /// One permit per WebSocket connection being told the server is full
    /// ([`REFUSALS_AT_ONCE`]); beyond that, a refused socket is just closed.
    refusals: Arc<Semaphore>,
    /// The second (Unix time) of the last "limit reached" log line.
    refusal_logged: AtomicU64,
}

/// WebSocket connections over the limit answered with a 503 at once. Each
/// holds a descriptor for up to [`REFUSAL_GRACE`], out of the reserve kept
/// beside `max_connections` (`descriptors.rs`), so a flood is not answered
/// one by one.
const REFUSALS_AT_ONCE: usize = 32;
/// How long a refused connection has to send its request and take the 503.
const REFUSAL_GRACE: Duration = Duration::from_secs(2);

impl Shared {
    /// Admits a new connection from `peer` under `max_connections`: its id
    /// and the permit it holds while open.
    ///
    /// # Errors
    /// The server is full: the refusal is counted and logged, and the
    /// error is how many connections have been refused so far, this one
    /// included.
    pub(crate) fn admit(
        &self,
        peer: SocketAddr,
    ) -> Result<(ConnId, tokio::sync::OwnedSemaphorePermit), u64> {
        self.metrics
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let refused = self
                .metrics
                .connections_refused
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            // At most one line a second: a reconnect storm against a full
            // server must not become a storm of log lines.
            let second = crate::connection::now_ms() / 1000;
            let last = self.refusal_logged.swap(second, Ordering::Relaxed);
            if last != second {
                tracing::warn!(%peer, limit = self.metrics.connections_limit, refused_total = refused, "connection limit reached; refusing");
            }
            return Err(refused);
        };
        Ok((
            ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed)),
            permit,
        ))
    }
}

/// Runs the server until `shutdown` is cancelled, then shuts down
/// gracefully: stop accepting, close every connection with 1001 and a
/// reconnect hint, wait (up to the grace period) for them, flush the store.
///
/// # Errors
/// [`ServerError`] when the store or the token key cannot be opened, or the
/// store cannot be flushed at the end.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let fds = crate::descriptors::plan(config.max_connections);
    let (store, counters) = open_store(&config).await?;
    let key = if config.token_key.is_empty() {
        TokenKey::load_or_create(&config.data_dir)?
    } else {
        TokenKey::from_hex(&config.token_key)?
    };
    let groups = Groups::open(store.clone(), config.core()).await?;
    // Deadlines that passed while the server was down resolve before anyone
    // can act on the objects; scheduled pushes due fire (or are skipped as
    // missed) likewise.
    let resolved = groups.tick(crate::connection::now_ms()).await;
    if resolved.deadlines_resolved > 0 || resolved.schedules != Default::default() {
        tracing::info!(
            resolved = resolved.deadlines_resolved,
            pushes_fired = resolved.schedules.fired,
            pushes_skipped = resolved.schedules.skipped,
            "deadlines and scheduled pushes due while stopped were handled"
        );
    }
    // The runtime this runs on (`worker_threads`, or one per core).
    let runtime_workers = tokio::runtime::Handle::current().metrics().num_workers();
    let shared = Arc::new(Shared {
        outbox_limits: OutboxLimits {
            max_frames: config.outbox_max_frames,
            max_bytes: config.outbox_max_bytes,
        },
        groups,
        key,
        metrics: Metrics {
            page_reads: counters.page_reads,
            commits: counters.commits,
            fd_limit: fds.limit,
            connections_limit: fds.connections as u64,
            runtime_workers: runtime_workers as u64,
            ..Metrics::default()
        },
        shutdown: shutdown.clone(),
        tracker: TaskTracker::new(),
        next_conn: AtomicU64::new(1),
        permits: Arc::new(Semaphore::new(fds.connections)),
        refusals: Arc::new(Semaphore::new(REFUSALS_AT_ONCE)),
        refusal_logged: AtomicU64::new(0),
        config,
    });
    tracing::info!(
        ws = %listeners.ws.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        http = %listeners.http.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        quic = %listeners.quic.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        cert_sha256 = %listeners.quic.fingerprint,
        data_dir = %shared.config.data_dir.display(),
        storage = %shared.config.storage,
        worker_threads = shared.metrics.runtime_workers,
        "qun serving"
    );

    let http = {
        let shared = shared.clone();
        let token = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::http::serve(listeners.http, shared, token).await {
                tracing::error!(error = %e, "http listener failed");
            }
        })
    };
    let sweeper = tokio::spawn(forget_idle_senders(shared.clone()));
    let ticker = tokio::spawn(commerce_ticks(shared.clone()));
    // Big groups' fan-out, in turns (see `Groups::run_fan_out`): one
    // worker per runtime thread; they run until the store closes, so pushes
    // reach connections during the shutdown grace.
    let fanout_stop = CancellationToken::new();
    let fanout: Vec<_> = (0..runtime_workers)
        .map(|_| {
            let (shared, stop) = (shared.clone(), fanout_stop.clone());
            tokio::spawn(async move { shared.groups.run_fan_out(stop.cancelled_owned()).await })
        })
        .collect();
    let quic_endpoint = listeners.quic.endpoint.clone();
    let quic = tokio::spawn(crate::quic::accept_loop(
        listeners.quic.endpoint,
        shared.clone(),
    ));
    accept_loop(listeners.ws, &shared).await;
    sweeper.abort();
    ticker.abort();

    tracing::info!("shutting down: closing connections");
    shared.tracker.close();
    let grace = Duration::from_millis(shared.config.shutdown_grace_ms);
    if tokio::time::timeout(grace, shared.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = shared.tracker.len(),
            "grace period over; closing the store anyway"
        );
    }
    let _ = tokio::time::timeout(grace, http).await;
    let _ = quic.await;
    quic_endpoint.close(
        quinn::VarInt::from(crate::transport::close::GOING_AWAY),
        b"shutdown",
    );
    let _ = tokio::time::timeout(grace, quic_endpoint.wait_idle()).await;
    fanout_stop.cancel();
    for worker in fanout {
        let _ = worker.await;
    }
    store.close().await?;
    tracing::info!("shutdown complete");
    Ok(())
}

async fn accept_loop(listener: TcpListener, shared: &Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                shared.metrics.accept_errors.fetch_add(1, Ordering::Relaxed);
                // EMFILE (24) / ENFILE (23): out of file descriptors.
                if matches!(e.raw_os_error(), Some(23 | 24)) {
                    tracing::error!(
                        error = %e,
                        "out of file descriptors: cannot accept connections; raise `ulimit -n` or lower max_connections"
                    );
                } else {
                    tracing::warn!(error = %e, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (conn, permit) = match shared.admit(peer) {
            Ok(admitted) => admitted,
            Err(refused) => {
                // Tell the client why, so that it backs off instead of
                // retrying a reset at once.
                if let Ok(slot) = shared.refusals.clone().try_acquire_owned() {
                    let limit = shared.metrics.connections_limit;
                    let wait = crate::websocket::retry_after_s(refused);
                    shared.tracker.spawn(async move {
                        crate::websocket::refuse_full(stream, limit, wait, REFUSAL_GRACE).await;
                        drop(slot);
                    });
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let span = crate::connection::span(conn, peer, "ws");
        shared
            .tracker
            .spawn(crate::connection::serve(stream, conn, shared.clone(), permit).instrument(span));
    }
}

/// Now and then, forgets the rate buckets of buyers who have gone quiet, so
/// their memory does not grow with every buyer who ever sent a message.
async fn forget_idle_senders(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = every.tick() => {
                let limited = shared.groups.forget_idle_senders(crate::connection::now_ms());
                tracing::trace!(limited, "idle rate buckets forgotten");
            }
        }
    }
}

/// Resolves commerce deadlines, posts coalesced progress and fires
/// scheduled pushes, every `commerce_tick_ms`. The server never ticks per object or per second:
/// clients render countdowns from deadlines and the server clock.
async fn commerce_ticks(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(Duration::from_millis(shared.config.commerce_tick_ms));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = every.tick() => {
                let report = shared.groups.tick(crate::connection::now_ms()).await;
                if report != qun_chat_core::TickReport::default() {
                    tracing::trace!(?report, "commerce tick");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_store_is_opened_with_the_configured_partitions() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            store_partitions: 3,
            ..Config::default()
        };
        let (store, _) = open_store(&config).await.unwrap();
        store.close().await.unwrap();
        let count = std::fs::read_to_string(dir.path().join("partitions")).unwrap();
        assert_eq!(count.trim(), "3");
        assert!(dir.path().join("p2").is_dir());
    }

    #[tokio::test]
    async fn a_busy_address_is_refused_with_its_name() {
        let first = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let config = Config {
            ws_listen: addr,
            ..Config::default()
        };
        match Listeners::bind(&config).await {
            Err(e @ ServerError::Bind { .. }) => {
                assert!(e.to_string().contains(&addr.to_string()), "{e}");
            }
            other => panic!("expected a bind error, got {other:?}"),
        }
    }

    /// A reconnect storm finds room in the accept queue: more connections
    /// than tokio's default backlog (1,024) complete their handshake while
    /// the server accepts none of them.
    #[tokio::test]
    async fn the_accept_queue_holds_a_reconnect_storm() {
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(0);
        const STORM: usize = 1_500;
        if somaxconn < STORM as u32 {
            eprintln!("net.core.somaxconn is {somaxconn}, below {STORM}: nothing to test");
            return;
        }
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut open = Vec::with_capacity(STORM);
        for n in 0..STORM {
            let connect = tokio::net::TcpStream::connect(addr);
            // On loopback a queued handshake completes at once; a dropped
            // SYN would wait a full second for its retransmit.
            match tokio::time::timeout(Duration::from_millis(500), connect).await {
                Ok(Ok(stream)) => open.push(stream),
                other => panic!("connection {n} of {STORM} not queued: {other:?}"),
            }
        }
        assert_eq!(open.len(), STORM);
        drop(listener);
    }
}
