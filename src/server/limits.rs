//! What a client may hold: connections (in total and per address), time to send a
//! request body (an idle limit plus a minimum average rate), and time a response may stay
//! stuck because the client does not read it.
//!
//! - [`Gate`] counts open connections; past a cap the connection is refused at once
//!   (plain HTTP gets a one-shot `503` with `Retry-After`, TLS is just closed). IPv6
//!   clients are counted per /64, the block one host usually owns.
//! - [`SendTimeout`] wraps a connection's stream: a write (or flush) that stays pending
//!   for the limit fails with `TimedOut`, which ends the connection; any progress starts
//!   the wait again.
//! - [`PacedBody`] reads a request body: it fails when no byte came for the idle limit,
//!   or when the body is behind its budget of `idle + received / min_rate` seconds since
//!   the first read, so trickling one byte at a time does not hold a slot for long.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The server's limits on what clients may hold (see the `serve` flags).
#[derive(Debug, Clone)]
pub struct Limits {
    /// A request's headers (and an idle keep-alive connection's next request) must
    /// arrive within this time.
    pub header_timeout: Duration,
    /// A request body that sends nothing for this long is dropped (408).
    pub body_idle_timeout: Duration,
    /// Bytes per second a request body must average, after a grace of
    /// `body_idle_timeout`; 0 disables the rate check.
    pub body_min_rate: u64,
    /// A response the client does not read for this long is dropped.
    pub send_timeout: Duration,
    /// Open connections, all clients together.
    pub max_connections: usize,
    /// Open connections from one IPv4 address or one IPv6 /64.
    pub max_connections_per_client: usize,
    /// Uploads (POST) receiving at once; beyond, 429.
    pub max_uploads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(30),
            body_idle_timeout: Duration::from_secs(30),
            body_min_rate: 8 * 1024,
            send_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_connections_per_client: 64,
            max_uploads: 128,
        }
    }
}

impl Limits {
    /// For a server only its own machine uses (the tests, a mount's embedded server on
    /// loopback): every client has the same address, so there is no cap per client; the
    /// rest as [`Limits::default`].
    pub fn local() -> Self {
        let d = Limits::default();
        Limits {
            max_connections_per_client: d.max_connections,
            ..d
        }
    }
}

/// Who a connection is counted against.
fn client_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

/// Counts open connections, in total and per client.
pub(crate) struct Gate {
    total: usize,
    per_client: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; dropping it frees its place.
pub(crate) struct Ticket {
    gate: Arc<Gate>,
    client: IpAddr,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    Total,
    Client,
}

impl Gate {
    pub(crate) fn new(total: usize, per_client: usize) -> Arc<Self> {
        Arc::new(Gate {
            total: total.max(1),
            per_client: per_client.max(1),
            open: Mutex::new((0, HashMap::new())),
        })
    }

    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refused> {
        let client = client_of(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.0 >= self.total {
            return Err(Refused::Total);
        }
        let n = open.1.entry(client).or_insert(0);
        if *n >= self.per_client {
            return Err(Refused::Client);
        }
        *n += 1;
        open.0 += 1;
        Ok(Ticket {
            gate: self.clone(),
            client,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(|p| p.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.client);
            }
        }
    }
}

/// A stream whose writes fail once they make no progress for a while.
pub(crate) struct SendTimeout<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> SendTimeout<S> {
    pub(crate) fn new(inner: S, limit: Duration) -> Self {
        SendTimeout {
            inner,
            limit,
            stalled: None,
        }
    }

    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => {
                let limit = self.limit;
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if timer.as_mut().poll(cx).is_ready() {
                    self.stalled = None;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client has not read for the send timeout",
                    )));
                }
                Poll::Pending
            }
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, r)
    }
}

/// Why reading a body stopped early.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// Idle for too long, or below the minimum rate: answer 408 and close.
    TooSlow,
    /// The connection broke or the framing was invalid.
    Broken(hyper::Error),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooSlow => f.write_str("body too slow (idle or under the minimum rate)"),
            BodyError::Broken(e) => write!(f, "{e}"),
        }
    }
}

/// A request body read under the idle and rate limits.
pub(crate) struct PacedBody {
    body: Incoming,
    started: Option<Instant>,
    received: u64,
    idle: Duration,
    min_rate: u64,
}

impl PacedBody {
    pub(crate) fn new(body: Incoming, limits: &Limits) -> Self {
        PacedBody {
            body,
            started: None,
            received: 0,
            idle: limits.body_idle_timeout,
            min_rate: limits.body_min_rate,
        }
    }

    /// Bytes received so far.
    pub(crate) fn received(&self) -> u64 {
        self.received
    }

    /// When the next byte must have come.
    fn deadline(&mut self) -> Instant {
        let now = Instant::now();
        let start = *self.started.get_or_insert(now);
        let idle = now + self.idle;
        if self.min_rate == 0 {
            return idle;
        }
        let budget = Duration::from_secs_f64(self.received as f64 / self.min_rate as f64);
        idle.min(start + self.idle + budget)
    }

    /// The next data chunk; `None` at the end of the body.
    pub(crate) async fn data(&mut self) -> Result<Option<Bytes>, BodyError> {
        loop {
            let deadline = self.deadline();
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return Err(BodyError::TooSlow),
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => return Err(BodyError::Broken(e)),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.received += data.len() as u64;
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_counted_per_address_and_per_64() {
        let gate = Gate::new(10, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t1 = gate.admit(a).unwrap();
        let _t2 = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).err(), Some(Refused::Client));
        let _t3 = gate.admit(b).unwrap();
        drop(t1);
        let _t4 = gate.admit(a).unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        let _t5 = gate.admit(mapped).unwrap();
        assert_eq!(gate.admit(b).err(), Some(Refused::Client));
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        let v6c: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        let _t6 = gate.admit(v6a).unwrap();
        let _t7 = gate.admit(v6b).unwrap();
        assert_eq!(gate.admit(v6a).err(), Some(Refused::Client));
        let _t8 = gate.admit(v6c).unwrap();
        let small = Gate::new(1, 5);
        let _only = small.admit(a).unwrap();
        assert_eq!(small.admit(b).err(), Some(Refused::Total));
    }
}
