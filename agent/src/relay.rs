//! Plain TCP relay: both directions at once, half-close carried across,
//! backpressure from awaiting each write, and an idle timeout.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Workload → server.
    pub bytes_up: u64,
    /// Server → workload.
    pub bytes_down: u64,
}

#[derive(Debug)]
pub enum RelayEnd {
    /// Both sides closed their writing halves.
    Closed(Counts),
    /// Nothing moved either way for the idle timeout.
    Idle(Counts),
    Error(Counts, io::Error),
}

/// Millisecond clock shared by both directions: the last time a read
/// returned data.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A stream that records activity on every successful read.
struct Watched<'a> {
    inner: &'a mut TcpStream,
    activity: Arc<Activity>,
    /// Bytes read from this side (counted here so an idle or failed relay
    /// still reports what moved).
    read: u64,
}

impl AsyncRead for Watched<'_> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if matches!(r, Poll::Ready(Ok(()))) && n > 0 {
            self.read += n as u64;
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Watched<'_> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

enum Stop {
    Idle,
    Failed(io::Error),
}

/// Relay until both sides are done, an error, or `idle` without traffic.
pub async fn relay(client: &mut TcpStream, upstream: &mut TcpStream, idle: Duration) -> RelayEnd {
    let activity = Arc::new(Activity { start: Instant::now(), last_ms: AtomicU64::new(0) });
    let mut a = Watched { inner: client, activity: activity.clone(), read: 0 };
    let mut b = Watched { inner: upstream, activity: activity.clone(), read: 0 };
    let check = (idle / 4).max(Duration::from_millis(100));
    let end = {
        // 64 KiB buffers each way: large enough to batch, bounded per connection.
        let copy = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 64 * 1024, 64 * 1024);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                r = &mut copy => break r.err().map(Stop::Failed),
                () = tokio::time::sleep(check) => {
                    if activity.idle_for() >= idle {
                        break Some(Stop::Idle);
                    }
                }
            }
        }
    };
    let counts = Counts { bytes_up: a.read, bytes_down: b.read };
    match end {
        None => RelayEnd::Closed(counts),
        Some(Stop::Idle) => RelayEnd::Idle(counts),
        Some(Stop::Failed(e)) => RelayEnd::Error(counts, e),
    }
}

/// The `tcp` protocol: connect upstream, relay bytes both ways, audited per
/// connection.
pub async fn serve(client: tokio::net::TcpStream, s: crate::protocol::Session) -> crate::protocol::End {
    use crate::protocol::End;
    let ticket = match s.admission {
        Ok(t) => t,
        // A byte relay has no words for the client: the connection closes.
        Err(r) => return End { outcome: r.outcome, error: Some(r.message), ..End::default() },
    };
    let wait_durable = async {
        if s.shared.audit.durability() == crate::audit::Durability::Statement {
            ticket.durable().await
        } else {
            Ok(())
        }
    };
    let (up, durable) = tokio::join!(crate::proxy::connect_upstream(s.upstream, &s.shared), wait_durable);
    let (outcome, c, error) = match (up, durable) {
        (_, Err(e)) => ("audit_unavailable", Counts::default(), Some(e.to_string())),
        (Err(e), _) => ("upstream_connect_failed", Counts::default(), Some(format!("{e:#}"))),
        (Ok(mut upstream), Ok(())) => {
            let mut client = client;
            match relay(&mut client, &mut upstream, s.shared.idle_timeout()).await {
                RelayEnd::Closed(c) => ("closed", c, None),
                RelayEnd::Idle(c) => ("idle_timeout", c, None),
                RelayEnd::Error(c, e) => ("error", c, Some(e.to_string())),
            }
        }
    };
    End { outcome, error, bytes_up: c.bytes_up, bytes_down: c.bytes_down, fields: Vec::new() }
}
