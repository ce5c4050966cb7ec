//! `shacachefs status MOUNTPOINT`: reads the running daemon's status document from the
//! root's `user.shacachefs.status` extended attribute: counters, the servers' state and
//! the transfers in flight. `--watch` reads it again every second until interrupted
//! (the daemon probes the servers at most every few seconds, however often it is read),
//! clearing the screen between reads only on a terminal.

use crate::cli::StatusArgs;
use crate::fs::status::STATUS_XATTR;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::ffi::CString;
use std::io::{IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;

fn getxattr(path: &std::path::Path, name: &str) -> std::io::Result<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let n = CString::new(name)?;
    let mut buf = vec![0u8; 256 * 1024];
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

pub fn run(args: StatusArgs) -> Result<()> {
    if !args.watch {
        return show(&args);
    }
    let tty = std::io::stdout().is_terminal();
    loop {
        if tty {
            // Home, then clear the screen.
            print!("\x1b[H\x1b[2J");
        }
        show(&args)?;
        if !tty {
            println!();
        }
        std::io::stdout().flush()?;
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn read(args: &StatusArgs) -> Result<Value> {
    let raw = match getxattr(&args.mountpoint, STATUS_XATTR) {
        Ok(v) => v,
        Err(e)
            if e.raw_os_error() == Some(libc::ENODATA)
                || e.raw_os_error() == Some(libc::ENOTSUP) =>
        {
            bail!("{}: not a shacachefs mount", args.mountpoint.display())
        }
        Err(e) => return Err(e).with_context(|| format!("{}", args.mountpoint.display())),
    };
    serde_json::from_slice(&raw).context("status document")
}

fn show(args: &StatusArgs) -> Result<()> {
    let v = read(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let g = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
    let s = |x: Value| match x {
        Value::String(s) => s,
        other => other.to_string(),
    };
    println!("mount:      {}", args.mountpoint.display());
    for srv in g("servers").as_array().cloned().unwrap_or_default() {
        println!(
            "server:     {} {}",
            s(srv["role"].clone()),
            s(srv["url"].clone())
        );
    }
    println!("shadir:     {}", s(g("shadir")));
    println!(
        "shacache:   {}   (servers probed {}s ago)",
        s(g("shacache")),
        g("probed_secs_ago")
    );
    println!("signatures: {}", s(g("signature_mode")));
    println!(
        "writable:   {}   passthrough: {}",
        g("writable"),
        g("passthrough")
    );
    let c = g("cache");
    println!(
        "cache:      {} ({} of {} bytes, {} blobs, {} bytes pinned)",
        s(c["dir"].clone()),
        c["used_bytes"],
        c["limit_bytes"],
        c["blobs"],
        c["pinned_bytes"]
    );
    println!(
        "reads:      {} hits, {} misses, {} downloads in flight, {} bytes fetched",
        g("hits"),
        g("misses"),
        g("downloads_in_flight"),
        g("bytes_fetched")
    );
    println!(
        "trust:      {} entries hidden (untrusted), {} downloads failed verification",
        g("hidden_entries"),
        g("verification_failures")
    );
    println!(
        "writes:     {} entries published, {} bytes uploaded, {} pending in the outbox",
        g("entries_published"),
        g("bytes_uploaded"),
        g("outbox_pending")
    );
    let w = g("uploads_while_writing");
    println!(
        "            uploads while writing: {} started, {} used, {} sent again at close",
        w["started"], w["used"], w["sent_again"]
    );
    let transfers = g("transfers").as_array().cloned().unwrap_or_default();
    if transfers.is_empty() {
        println!("transfers:  none in flight");
    } else {
        let more = g("transfers_not_listed").as_u64().unwrap_or(0);
        println!("transfers:  {} in flight", transfers.len() as u64 + more);
        for t in &transfers {
            println!("  {}", transfer_line(t));
        }
        if let Some(n) = g("transfers_not_listed").as_u64().filter(|n| *n > 0) {
            println!("  … and {n} more");
        }
    }
    Ok(())
}

/// One transfer: `download  KEY  NAME  DONE of TOTAL (PCT)  RATE/s  ELAPSED`.
fn transfer_line(t: &Value) -> String {
    let done = t["done_bytes"].as_u64().unwrap_or(0);
    let of = match t["total_bytes"].as_u64() {
        Some(total) if total > 0 => format!(
            "{} of {} ({:.0}%)",
            bytes(done),
            bytes(total),
            done as f64 * 100.0 / total as f64
        ),
        Some(total) => format!("{} of {}", bytes(done), bytes(total)),
        None => format!("{} of ?", bytes(done)),
    };
    let key = t["key"].as_str().unwrap_or(".sha512");
    format!(
        "{:<8}  {key}  {}  {of}  {}/s  {:.0}s",
        t["direction"].as_str().unwrap_or("?"),
        t["name"].as_str().unwrap_or("?"),
        bytes(t["rate_bytes_per_sec"].as_f64().unwrap_or(0.0) as u64),
        t["elapsed_secs"].as_f64().unwrap_or(0.0)
    )
}

/// Bytes in binary units, one decimal.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_lines() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        let t = serde_json::json!({
            "direction": "download", "key": "k", "name": "a.bin",
            "done_bytes": 1u64 << 20, "total_bytes": 4u64 << 20,
            "rate_bytes_per_sec": 524288.0, "elapsed_secs": 2.0,
        });
        assert_eq!(
            transfer_line(&t),
            "download  k  a.bin  1.0 MiB of 4.0 MiB (25%)  512.0 KiB/s  2s"
        );
        let t = serde_json::json!({
            "direction": "upload", "key": null, "name": "0123456789abcdef",
            "done_bytes": 10, "total_bytes": null,
            "rate_bytes_per_sec": 5.0, "elapsed_secs": 2.4,
        });
        assert_eq!(
            transfer_line(&t),
            "upload    .sha512  0123456789abcdef  10 B of ?  5 B/s  2s"
        );
    }
}
