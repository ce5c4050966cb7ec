//! Lets the reference client's raw keys through. It puts keys into the URL path without
//! percent-encoding (production keys contain `<` and `>`, e.g. `pypi:x<3,>=2`), and the
//! HTTP parser refuses a request line holding `<`, `>` or a backtick with a bare 400
//! before any handler runs. This wrapper percent-encodes those three bytes in the first
//! line a connection sends: the reference client opens one connection per request, so
//! that is every request line of it; clients that keep connections alive (ours) encode
//! keys themselves. Handlers percent-decode the path, so both spellings are one key.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream whose first line (up to the first `\n`) has `<`, `>` and `` ` ``
/// percent-encoded on the way in.
pub struct EncodeRequestLine<S> {
    inner: S,
    in_first_line: bool,
    pending: Vec<u8>,
    pos: usize,
}

impl<S> EncodeRequestLine<S> {
    pub fn new(inner: S) -> Self {
        EncodeRequestLine {
            inner,
            in_first_line: true,
            pending: Vec::new(),
            pos: 0,
        }
    }
}

/// Rewrites `data` while still in the first line; returns the bytes to hand on.
fn rewrite(data: &[u8], in_first_line: &mut bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 8);
    for &b in data {
        if *in_first_line {
            match b {
                b'<' => out.extend_from_slice(b"%3C"),
                b'>' => out.extend_from_slice(b"%3E"),
                b'`' => out.extend_from_slice(b"%60"),
                b'\n' => {
                    *in_first_line = false;
                    out.push(b);
                }
                _ => out.push(b),
            }
        } else {
            out.push(b);
        }
    }
    out
}

impl<S: AsyncRead + Unpin> AsyncRead for EncodeRequestLine<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.pending.len() {
            let n = (this.pending.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.pending[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        if !this.in_first_line {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let mut tmp = [0u8; 4096];
        let mut tmp_buf = ReadBuf::new(&mut tmp);
        match Pin::new(&mut this.inner).poll_read(cx, &mut tmp_buf) {
            Poll::Ready(Ok(())) => {
                let got = tmp_buf.filled();
                if got.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.pending = rewrite(got, &mut this.in_first_line);
                this.pos = 0;
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pos = n;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for EncodeRequestLine<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_line_is_rewritten() {
        let mut first = true;
        let a = rewrite(
            b"GET /shadir/pypi:x<3,>=2`a HTTP/1.0\r\nX: <b>\r\n",
            &mut first,
        );
        assert_eq!(
            a,
            b"GET /shadir/pypi:x%3C3,%3E=2%60a HTTP/1.0\r\nX: <b>\r\n".to_vec()
        );
        assert!(!first);
        let b = rewrite(b"<body>", &mut first);
        assert_eq!(b, b"<body>".to_vec());
    }

    #[test]
    fn split_first_line_keeps_state() {
        let mut first = true;
        let mut out = rewrite(b"GET /a<", &mut first);
        assert!(first);
        out.extend(rewrite(b">b HTTP/1.1\r\n<", &mut first));
        assert_eq!(out, b"GET /a%3C%3Eb HTTP/1.1\r\n<".to_vec());
    }
}
