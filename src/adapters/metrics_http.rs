//! The metrics adapter: a small HTTP/1.1 listener (hyper) that answers `GET /metrics` with
//! the text a caller-supplied `render` returns (Prometheus/OpenMetrics text), and 404 to
//! everything else; and the process figures read from `/proc/self`.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections at once (more are closed on accept), request
//! heads up to [`MAX_HEAD_BYTES`], a head must arrive within [`HEAD_TIMEOUT`], and a connection
//! lives at most [`CONNECTION_LIFETIME`]. Bodies are never read. `render` runs on a blocking
//! thread (it may scan the store).
//! Must not: serve anything but the rendered metrics; start a task that outlives [`serve`]
//! (connection tasks run under a tracker it waits for).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Connections served at once; further ones are closed straight away.
pub const MAX_CONNECTIONS: usize = 16;
/// The largest request head read (hyper's minimum buffer size).
pub const MAX_HEAD_BYTES: usize = 8192;
/// How long a client may take to send a request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection (keep-alive included) may live.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// The OpenMetrics text content type `prometheus-client` produces.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders the metrics text for one scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `GET /metrics` until `shutdown`, then waits for open connections to end.
pub async fn serve(listener: TcpListener, render: Render, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!("metrics listener accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(%remote, "metrics connection refused: {MAX_CONNECTIONS} already open");
            continue;
        };
        let (render, shutdown) = (render.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| answer(req, render.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = tokio::time::timeout(CONNECTION_LIFETIME, conn) => {
                    if let Ok(Err(e)) = r {
                        debug!(%remote, "metrics connection ended: {e}");
                    }
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn answer(
    req: Request<Incoming>,
    render: Render,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "not found; try GET /metrics\n",
        ));
    }
    match tokio::task::spawn_blocking(move || render()).await {
        Ok(text) => Ok(Response::builder()
            .header("content-type", CONTENT_TYPE)
            .body(Full::new(Bytes::from(text)))
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "response failed\n"))),
        Err(e) => {
            warn!("rendering metrics failed: {e}");
            Ok(plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering metrics failed\n",
            ))
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r
}

/// This process's figures, from `/proc/self` (Linux).
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessStats {
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    /// Seconds since the Unix epoch.
    pub start_time_seconds: f64,
    /// User plus system CPU time.
    pub cpu_seconds: f64,
}

impl ProcessStats {
    /// Reads the figures; any that cannot be read stay zero.
    pub fn read() -> Self {
        let mut s = Self::default();
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        let page = rustix::param::page_size() as u64;
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            let mut f = statm
                .split_whitespace()
                .map(|v| v.parse::<u64>().unwrap_or(0));
            s.virtual_bytes = f.next().unwrap_or(0) * page;
            s.resident_bytes = f.next().unwrap_or(0) * page;
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            s.open_fds = dir.count() as u64;
        }
        s.max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| {
                l.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
            });
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())
        });
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the parenthesised command name, which may itself contain spaces.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            // `rest` starts at field 3 (state): utime is field 14, stime 15, starttime 22.
            let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<f64>().ok());
            s.cpu_seconds = (field(14).unwrap_or(0.0) + field(15).unwrap_or(0.0)) / ticks;
            if let (Some(boot), Some(start)) = (boot, field(22)) {
                s.start_time_seconds = boot + start / ticks;
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_stats_are_read_from_proc() {
        let s = ProcessStats::read();
        assert!(s.resident_bytes > 0, "{s:?}");
        assert!(s.open_fds >= 3, "{s:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        assert!(
            s.start_time_seconds > 1.0e9 && s.start_time_seconds <= now + 1.0,
            "{s:?}"
        );
    }
}
