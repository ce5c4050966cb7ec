//! `shacachefs prefetch [--latest] [--pin | --unpin] KEY…`: fetches the trusted entries
//! of keys (or only the one `latest` points to) into the cache directory a mount uses,
//! verified, and pins them with `--pin`, so a node keeps working when it loses its
//! network; `--unpin` removes those pins (fetching nothing). This is also how a
//! read-only mount's blobs are pinned: the kernel refuses `setfattr` there (EROFS).
//!
//! Mounted or not: the cache directory is shared by design (every process holds its
//! open lock shared; blobs are renamed into place whole; pins are files checked under
//! `pins.lock` before any eviction, see `cache::pins`), so a running mount sees the new
//! blobs at its next open and never evicts a pin made here. The key's shadir answer
//! and the key itself are saved in the cache's tables too, as a mount would, so a mount
//! started later without a network shows the key and its entries.
//!
//! Without `--cache-size`, this process evicts nothing to stay under a limit (the
//! mount has its own, and evicts when it next needs room); it still evicts closed,
//! unpinned blobs when the disk itself is short, as a mount does.

use super::mount::{default_cache_dir, resolve_config};
use super::{client_with, progress_bar, track};
use crate::cache::{BlobPin, Cache, CacheOptions};
use crate::cli::PrefetchArgs;
use crate::client::{select_trusted, Client, TrustedEntry};
use crate::digest::Sha512;
use crate::naming::name_entries;
use crate::remote::{DirListing, Limits};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// How many times a pin fetches a blob that another process keeps evicting.
const PIN_ATTEMPTS: usize = 3;

pub async fn run(args: PrefetchArgs) -> Result<()> {
    // `_server`: the embedded default's server runs until the end, as for `mount`.
    let (cfg, _server, namespace) = resolve_config(args.config.config.clone()).await?;
    let client = client_with(&cfg, Limits::default())?;
    if !client.store.can_download() {
        bail!(
            "{}: download-cache-url and download-dir-url are required",
            cfg.source.display()
        );
    }
    let dir = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let cache = Cache::open(CacheOptions {
        dir: dir.clone(),
        max_bytes: args.cache_size.unwrap_or(u64::MAX),
        namespace,
    })?;
    let mut failed = 0usize;
    for key in &args.keys {
        match prefetch_key(&client, &cache, key, &args).await {
            Ok(done) if args.unpin => {
                println!("{key}: {} blobs, {} unpinned", done.blobs, done.unpinned)
            }
            Ok(done) => println!(
                "{key}: {} blobs ({} bytes), {} fetched, {} pinned",
                done.blobs, done.bytes, done.fetched, done.pinned
            ),
            Err(e) => {
                failed += 1;
                eprintln!("shacachefs: {key}: {}", super::error_line(&e));
            }
        }
    }
    cache.close()?;
    if failed > 0 {
        bail!("{failed} of {} keys not prefetched", args.keys.len());
    }
    Ok(())
}

/// What one key cost.
#[derive(Default)]
struct Done {
    blobs: usize,
    bytes: u64,
    fetched: usize,
    pinned: usize,
    unpinned: usize,
}

async fn prefetch_key(
    client: &Client,
    cache: &Cache,
    key: &str,
    args: &PrefetchArgs,
) -> Result<Done> {
    let listing = match client.store.get_dir(key).await? {
        DirListing::Found(l) => l,
        DirListing::Missing => bail!("not found in shadir"),
    };
    // Saved as a mount saves it: a mount started offline shows this answer.
    cache.store_dir_answer(key, Some(&crate::fs::listing_body(listing.entries.iter())));
    cache.add_known_key(key);
    let (entries, hidden) = select_trusted(listing, &client.verifier);
    for h in &hidden {
        tracing::debug!("key {key}: entry hidden ({}): {}", h.reason, h.excerpt);
    }
    let named = name_entries(entries);
    // Each blob once, under the first name showing it.
    let mut blobs: BTreeMap<Sha512, String> = BTreeMap::new();
    let wanted: Vec<&(String, TrustedEntry)> = if args.latest {
        let latest = named
            .latest
            .as_ref()
            .context("no entry has a numeric timestamp: there is no latest")?;
        named.files.iter().filter(|(n, _)| n == latest).collect()
    } else {
        named.files.iter().collect()
    };
    if wanted.is_empty() {
        bail!("no trusted entry");
    }
    for (name, e) in wanted {
        blobs.entry(e.info.sha512).or_insert_with(|| name.clone());
    }
    let mut done = Done::default();
    if args.unpin {
        for sha in blobs.keys() {
            done.blobs += 1;
            if cache.unpin_blob(sha)? {
                done.unpinned += 1;
            }
        }
        return Ok(done);
    }
    for (sha, name) in &blobs {
        let what = format!("{key}/{name}");
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (len, held, fetched) = hold_blob(client, cache, sha, &what)
                .await
                .with_context(|| format!("{name} (blob {})", sha.short(16)))?;
            if fetched {
                done.fetched += 1;
            }
            if args.pin && !cache.pin_blob(&held)? {
                if attempts < PIN_ATTEMPTS {
                    continue; // evicted by another process just before the pin
                }
                bail!("{name}: the blob was evicted while being pinned");
            }
            done.blobs += 1;
            done.bytes += len;
            if args.pin {
                done.pinned += 1;
            }
            break;
        }
    }
    Ok(done)
}

/// The blob open in the cache (fetched and verified first when absent), held against
/// eviction until the returned pin is dropped; its length, and whether it was fetched.
async fn hold_blob(
    client: &Client,
    cache: &Cache,
    sha: &Sha512,
    what: &str,
) -> Result<(u64, BlobPin, bool)> {
    if let Some((_file, len, held)) = cache.open_blob_checked(sha)? {
        return Ok((len, held, false));
    }
    let hint = cache.size_of(sha);
    if let Some(n) = hint {
        cache.could_hold(n)?;
    }
    let reservation = Mutex::new(cache.reserve(0)?);
    let room = |have: u64, to: u64| crate::fs::room_in(&reservation, have, to, hint);
    let bar = progress_bar(what);
    let fetched = client
        .store
        .fetch_blob(sha, cache.tmp_dir(), &track(&bar), &room)
        .await;
    bar.finish_and_clear();
    let verified = fetched?;
    let reservation = reservation.into_inner().unwrap_or_else(|p| p.into_inner());
    let (_file, len, held) = cache.insert_and_open(verified, Some(reservation))?;
    Ok((len, held, true))
}
