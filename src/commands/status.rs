//! `shacachefs status MOUNTPOINT`: reads the running daemon's status document from the
//! root's `user.shacachefs.status` extended attribute.

use crate::cli::StatusArgs;
use crate::fs::status::STATUS_XATTR;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::ffi::CString;
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
    let v: Value = serde_json::from_slice(&raw).context("status document")?;
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
    println!("shacache:   {}", s(g("shacache")));
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
    Ok(())
}
