//! `shacachefs download`: the job of `networkcache-download`: the trusted entries of a
//! key, filtered in order, listed (`-l`, the same JSON as the reference client) or the
//! first one's blob written out, verified before a byte reaches its destination.

use super::{client_for, load_config, progress_bar, track};
use crate::cli::DownloadArgs;
use crate::filter::{self, Criterion};
use crate::pyjson::{dumps_with, Style};
use crate::wire::urlmd5_key;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::Write;

pub async fn run(args: DownloadArgs) -> Result<()> {
    let criteria = args
        .filters
        .iter()
        .map(|f| Criterion::parse(f))
        .collect::<Result<Vec<_>, _>>()?;
    let cfg = load_config(args.config.config.as_deref())?;
    let client = client_for(&cfg)?;
    let key = match (&args.key, &args.url) {
        (Some(k), _) => k.clone(),
        (None, Some(u)) => urlmd5_key(u),
        (None, None) => bail!("either --key or --url is required"),
    };
    let (entries, hidden) = client.select(&key).await?.unwrap_or_default();
    for h in &hidden {
        tracing::debug!("key {key}: entry hidden ({}): {}", h.reason, h.excerpt);
    }
    let selected = filter::apply(
        &criteria,
        entries.iter().map(|e| &e.info.metadata).collect(),
    );
    if selected.is_empty() {
        bail!("No result found with given criteria.");
    }
    if args.list {
        let list = Value::Array(
            selected
                .iter()
                .map(|m| Value::Object((*m).clone()))
                .collect(),
        );
        let mut out = dumps_with(
            &list,
            Style {
                indent: Some(2),
                sort_keys: true,
            },
        );
        out.push('\n');
        std::io::stdout().write_all(out.as_bytes())?;
        return Ok(());
    }
    let first = selected[0];
    let sha = entries
        .iter()
        .find(|e| std::ptr::eq(&e.info.metadata, first))
        .map(|e| e.info.sha512)
        .context("selected entry vanished")?;
    // Download next to the destination so the final rename is atomic.
    let tmp_dir = match &args.output {
        Some(out) => match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        },
        None => std::env::temp_dir(),
    };
    let bar = progress_bar("download");
    let verified = client
        .store
        .fetch_blob(&sha, &tmp_dir, &track(&bar), &crate::remote::unbounded)
        .await?;
    bar.finish_and_clear();
    match &args.output {
        Some(out) => {
            verified
                .persist(out)
                .with_context(|| format!("cannot write {}", out.display()))?;
        }
        None => {
            let mut f = std::fs::File::open(verified.path())?;
            let mut stdout = std::io::stdout().lock();
            std::io::copy(&mut f, &mut stdout)?;
            stdout.flush()?;
        }
    }
    Ok(())
}
