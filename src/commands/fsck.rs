//! `shacachefs fsck`: re-hashes every cached blob, removes the wrong ones, and checks
//! that every outbox item still has its data. Pins are kept, also those of a blob
//! removed as wrong (its next open or `prefetch` fetches it again).

use super::mount::default_cache_dir;
use crate::cache::{Cache, CacheOptions};
use crate::cli::FsckArgs;
use crate::outbox::Outbox;
use anyhow::Result;

pub fn run(args: FsckArgs) -> Result<()> {
    let dir = args.cache_dir.unwrap_or_else(default_cache_dir);
    let cache = Cache::open(CacheOptions {
        dir: dir.clone(),
        max_bytes: u64::MAX,
        namespace: String::new(),
    })?;
    let report = cache.fsck()?;
    cache.close()?;
    println!(
        "{}: {} blobs checked ({} bytes), {} removed",
        dir.display(),
        report.checked,
        report.bytes,
        report.removed.len()
    );
    for sha in &report.removed {
        println!("removed {sha}: content did not match its name");
    }
    let pinned = cache.pinned();
    let absent: Vec<_> = pinned
        .iter()
        .filter(|s| !cache.blob_path(s).is_file())
        .collect();
    println!(
        "pins: {} blobs pinned, {} of them not in the cache",
        pinned.len(),
        absent.len()
    );
    for sha in absent {
        println!("pinned {sha} is not in the cache: its next open or prefetch fetches it");
    }
    let outbox = Outbox::open(&dir)?;
    let (items, broken) = outbox.list();
    let missing: Vec<_> = items
        .iter()
        .filter(|i| !outbox.data_path(&i.id).is_file())
        .collect();
    println!(
        "outbox: {} pending, {} unreadable, {} without data",
        items.len(),
        broken.len(),
        missing.len()
    );
    for i in missing {
        println!(
            "outbox item {} ({} under {}) has no data",
            i.id, i.meta.name, i.meta.key
        );
    }
    Ok(())
}
