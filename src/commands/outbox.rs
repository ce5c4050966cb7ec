//! `shacachefs outbox list|retry|drop`: the pending uploads of a cache directory,
//! whether or not a mount is running on it (the per-item lock keeps a mount and this
//! command from publishing one file twice).

use super::client_for;
use super::mount::{default_cache_dir, resolve_config};
use crate::cache::{Cache, CacheOptions};
use crate::cli::{OutboxAction, OutboxArgs};
use crate::digest::adopt_hashed;
use crate::outbox::Outbox;
use crate::publish::publish;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub async fn run(args: OutboxArgs) -> Result<()> {
    let cache_dir = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let outbox = Outbox::open(&cache_dir)
        .with_context(|| format!("cannot open the outbox of {}", cache_dir.display()))?;
    match args.action {
        OutboxAction::List { json } => list(&outbox, json),
        OutboxAction::Drop { ids } => {
            for id in ids {
                outbox
                    .remove(&id)
                    .with_context(|| format!("outbox item {id}"))?;
                eprintln!("dropped {id}");
            }
            Ok(())
        }
        OutboxAction::Retry { config, ids } => retry(&outbox, &cache_dir, config.config, ids).await,
    }
}

fn list(outbox: &Outbox, as_json: bool) -> Result<()> {
    let (items, broken) = outbox.list();
    if as_json {
        let v: Vec<Value> = items
            .iter()
            .map(|i| {
                let size = std::fs::metadata(outbox.data_path(&i.id))
                    .map(|m| m.len())
                    .ok();
                json!({"id": i.id, "key": i.meta.key, "name": i.meta.name, "size": size,
                       "namespace": i.meta.namespace, "created": i.meta.created,
                       "last_error": i.meta.last_error, "path": outbox.data_path(&i.id)})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for i in &items {
            let size = std::fs::metadata(outbox.data_path(&i.id))
                .map(|m| m.len().to_string())
                .unwrap_or_else(|_| "?".into());
            println!(
                "{}  {}  {}  {} bytes  {}",
                i.id,
                i.meta.key,
                i.meta.name,
                size,
                i.meta.last_error.as_deref().unwrap_or("not attempted")
            );
        }
        if items.is_empty() {
            eprintln!("outbox {} is empty", outbox.dir().display());
        }
    }
    for id in broken {
        eprintln!(
            "{id}: unreadable metadata (data kept in {})",
            outbox.data_path(&id).display()
        );
    }
    Ok(())
}

async fn retry(
    outbox: &Outbox,
    cache_dir: &std::path::Path,
    config: Option<std::path::PathBuf>,
    ids: Vec<String>,
) -> Result<()> {
    let (cfg, _server, namespace) = resolve_config(config).await?;
    let client = client_for(&cfg)?;
    if !client.remote.can_upload() {
        bail!("{}: no upload URLs configured", cfg.source.display());
    }
    let cache = Cache::open(CacheOptions {
        dir: cache_dir.to_path_buf(),
        max_bytes: u64::MAX,
        namespace: namespace.clone(),
    })?;
    let (items, _) = outbox.list();
    let mut failed = 0;
    let mut done = 0;
    for item in items {
        if !ids.is_empty() && !ids.contains(&item.id) {
            continue;
        }
        if ids.is_empty() && item.meta.namespace != namespace {
            eprintln!(
                "{}: meant for {}, not {}: skipped (name it to force)",
                item.id, item.meta.namespace, namespace
            );
            continue;
        }
        if item.meta.name.starts_with('.') {
            eprintln!(
                "{}: {} is a temporary dot-file: skipped",
                item.id, item.meta.name
            );
            continue;
        }
        match publish(&client, outbox, &item.id, None, None).await {
            Ok(p) => {
                if let Ok(v) = adopt_hashed(outbox.data_path(&item.id), p.sha, p.len) {
                    let _ = cache.insert_blob(v);
                }
                let _ = outbox.remove(&item.id);
                done += 1;
                println!(
                    "{}  published {} under {} ({})",
                    item.id, p.name, p.key, p.sha
                );
            }
            Err(e) => {
                failed += 1;
                eprintln!(
                    "{}: {} under {}: {e}",
                    item.id, item.meta.name, item.meta.key
                );
            }
        }
    }
    let _ = cache.close();
    if failed > 0 {
        bail!("{failed} upload(s) failed ({done} published); the files stay in the outbox");
    }
    Ok(())
}
