//! `shacachefs ls KEY`: a key's trusted entries under the names the mount gives them.

use super::{client_for, load_config};
use crate::cli::LsArgs;
use crate::client::entries_json;
use crate::naming::name_entries;
use crate::pyjson::{dumps_with, Style};
use anyhow::{bail, Result};
use serde_json::Value;

pub async fn run(args: LsArgs) -> Result<()> {
    let cfg = load_config(args.config.config.as_deref())?;
    let client = client_for(&cfg)?;
    let Some((entries, hidden)) = client.select(&args.key).await? else {
        bail!("key {}: not found in shadir", args.key);
    };
    for h in &hidden {
        tracing::debug!(
            "key {}: entry hidden ({}): {}",
            args.key,
            h.reason,
            h.excerpt
        );
    }
    let named = name_entries(entries);
    if args.json {
        println!(
            "{}",
            dumps_with(
                &entries_json(&named.files),
                Style {
                    indent: Some(2),
                    sort_keys: false
                }
            )
        );
        return Ok(());
    }
    for (name, e) in &named.files {
        let when = match e.info.metadata.get("timestamp") {
            Some(Value::Number(n)) => n.to_string(),
            _ => "-".into(),
        };
        let latest = if named.latest.as_deref() == Some(name.as_str()) {
            " (latest)"
        } else {
            ""
        };
        println!(
            "{}  {}  {}  {}{}",
            e.info.sha512.short(16),
            when,
            e.signer.label(),
            name,
            latest
        );
    }
    if !hidden.is_empty() {
        eprintln!(
            "({} entries hidden: not trusted or malformed; --log-level debug says why)",
            hidden.len()
        );
    }
    Ok(())
}
