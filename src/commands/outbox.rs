//! `shacachefs outbox list|retry|drop`: the pending uploads of a cache directory,
//! whether or not a mount is running on it. The per-item lock keeps a mount and this
//! command from publishing one file twice, and an item a mount holds open for writing
//! (its writer lock) is left alone by `retry` and `drop`: they claim each item for the
//! whole publish or removal, so no mount opens it meanwhile.
//!
//! `retry` publishes each item with the configuration of the server it is meant for
//! (its namespace): `-c FILE`, else each default configuration file that exists and
//! the embedded default (started only when an item is meant for it). It exits nonzero
//! when an item failed or was skipped for another server; items left alone because a
//! mount is writing them do not count (a cron `outbox retry` must not fail for that).

use super::client_for;
use super::mount::{default_cache_dir, embedded, embedded_namespace, namespace_of};
use crate::cache::{Cache, CacheOptions};
use crate::cli::{OutboxAction, OutboxArgs};
use crate::client::Client;
use crate::config::without_credentials;
use crate::digest::adopt_hashed;
use crate::outbox::{Item, Outbox};
use crate::publish::publish;
use crate::server::RunningServer;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub async fn run(args: OutboxArgs) -> Result<()> {
    let cache_dir = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let outbox = Outbox::open(&cache_dir)
        .with_context(|| format!("cannot open the outbox of {}", cache_dir.display()))?;
    match args.action {
        OutboxAction::List { json } => list(&outbox, json),
        OutboxAction::Drop { ids } => drop_items(&outbox, ids),
        OutboxAction::Retry { config, ids } => retry(&outbox, &cache_dir, config.config, ids).await,
    }
}

const HELD: &str =
    "open for writing by a mount: left alone (it is published when its writer closes it)";

fn drop_items(outbox: &Outbox, ids: Vec<String>) -> Result<()> {
    let mut errors = Vec::new();
    for id in ids {
        if !outbox.data_path(&id).parent().is_some_and(Path::is_dir) {
            eprintln!("{id}: no such outbox item (see `shacachefs outbox list`)");
            errors.push(id);
            continue;
        }
        let claim = match outbox.claim(&id) {
            Ok(Some(c)) => c,
            Ok(None) => {
                eprintln!("{id}: {HELD}; not dropped");
                continue;
            }
            Err(e) => {
                eprintln!("{id}: {e}");
                errors.push(id);
                continue;
            }
        };
        let removed = outbox.remove(&id);
        drop(claim);
        match removed {
            Ok(()) => eprintln!("dropped {id}"),
            Err(e) => {
                eprintln!("{id}: {e}");
                errors.push(id);
            }
        }
    }
    if !errors.is_empty() {
        bail!("could not drop {}", errors.join(", "));
    }
    Ok(())
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
                       "namespace": without_credentials(&i.meta.namespace),
                       "created": i.meta.created,
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

/// Where a configuration comes from.
#[derive(Debug, Clone)]
enum Source {
    File(PathBuf),
    Embedded,
}

/// A server items may be published to: known by its namespace before anything is
/// started; set up (client, cache, embedded server) on first use.
struct Target {
    source: Source,
    namespace: String,
    ready: Option<Result<Ready, String>>,
}

struct Ready {
    client: Client,
    cache: Arc<Cache>,
    _server: Option<RunningServer>,
}

impl Target {
    fn label(&self) -> String {
        match &self.source {
            Source::File(p) => p.display().to_string(),
            Source::Embedded => "the embedded default".to_string(),
        }
    }

    async fn ready(&mut self, cache_dir: &Path) -> std::result::Result<&Ready, String> {
        if self.ready.is_none() {
            let made = self
                .set_up(cache_dir)
                .await
                .map_err(|e| format!("{}: {}", self.label(), super::error_line(&e)));
            self.ready = Some(made);
        }
        match self.ready.as_ref() {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => Err(e.clone()),
            None => Err("not set up".into()),
        }
    }

    async fn set_up(&self, cache_dir: &Path) -> Result<Ready> {
        let (cfg, server) = match &self.source {
            Source::File(p) => (super::load_config(Some(p))?, None),
            Source::Embedded => {
                let (cfg, srv, _) = embedded().await?;
                (cfg, Some(srv))
            }
        };
        let client = client_for(&cfg)?;
        if !client.store.can_upload() {
            bail!("no upload URLs configured");
        }
        let cache = Cache::open(CacheOptions {
            dir: cache_dir.to_path_buf(),
            max_bytes: u64::MAX,
            namespace: self.namespace.clone(),
        })?;
        Ok(Ready {
            client,
            cache,
            _server: server,
        })
    }
}

/// The servers `retry` may publish to: `-c FILE` alone, else every default
/// configuration file that exists (the first is the one `mount` uses) and the embedded
/// default.
fn targets(explicit: Option<PathBuf>) -> Result<Vec<Target>> {
    let is_explicit = explicit.is_some();
    let sources: Vec<Source> = match explicit {
        Some(p) => vec![Source::File(p)],
        None => crate::config::DEFAULT_PATHS
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.exists())
            .map(Source::File)
            .chain([Source::Embedded])
            .collect(),
    };
    let mut out = Vec::new();
    for source in sources {
        let namespace = match &source {
            Source::File(p) => match super::load_config(Some(p)) {
                Ok(cfg) => namespace_of(&cfg),
                Err(e) if is_explicit => return Err(e),
                Err(e) => {
                    eprintln!("{}", super::error_line(&e));
                    continue;
                }
            },
            Source::Embedded => embedded_namespace(),
        };
        out.push(Target {
            source,
            namespace,
            ready: None,
        });
    }
    Ok(out)
}

async fn retry(
    outbox: &Outbox,
    cache_dir: &Path,
    config: Option<PathBuf>,
    ids: Vec<String>,
) -> Result<()> {
    let explicit = config.is_some();
    let mut targets = targets(config)?;
    let (items, broken) = outbox.list();
    for id in &ids {
        if !items.iter().any(|i| &i.id == id) {
            bail!("outbox item {id}: no such item (see `shacachefs outbox list`)");
        }
    }
    for id in broken
        .iter()
        .filter(|id| ids.is_empty() || ids.contains(id))
    {
        eprintln!(
            "{id}: unreadable metadata: skipped (data kept in {})",
            outbox.data_path(id).display()
        );
    }
    let (mut done, mut failed, mut held) = (0usize, 0usize, 0usize);
    let mut other: Vec<String> = Vec::new();
    for item in items {
        if !ids.is_empty() && !ids.contains(&item.id) {
            continue;
        }
        if item.meta.name.starts_with('.') {
            eprintln!(
                "{}: {} is a temporary dot-file: skipped",
                item.id, item.meta.name
            );
            continue;
        }
        let namespace = without_credentials(&item.meta.namespace);
        let forced = explicit && ids.contains(&item.id);
        let index = targets
            .iter()
            .position(|t| t.namespace == namespace)
            .or(if forced { Some(0) } else { None });
        let Some(index) = index else {
            eprintln!(
                "{}: meant for {namespace}, which no configuration used here names: skipped",
                item.id
            );
            if !other.contains(&namespace) {
                other.push(namespace);
            }
            continue;
        };
        match publish_one(outbox, cache_dir, &mut targets[index], &item).await {
            Outcome::Published(line) => {
                done += 1;
                println!("{line}");
            }
            Outcome::Held => {
                held += 1;
                eprintln!("{}: {HELD}", item.id);
            }
            Outcome::Failed(why) => {
                failed += 1;
                eprintln!(
                    "{}: {} under {}: {why}",
                    item.id, item.meta.name, item.meta.key
                );
            }
        }
    }
    for t in &targets {
        if let Some(Ok(r)) = &t.ready {
            let _ = r.cache.close();
        }
    }
    if held > 0 {
        eprintln!("{held} item(s) left alone: a mount is writing them");
    }
    let mut problems = Vec::new();
    if failed > 0 {
        problems.push(format!("{failed} upload(s) failed"));
    }
    if !other.is_empty() {
        let count = other.len();
        problems.push(format!(
            "items meant for {count} other server(s) were skipped ({}): pass -c FILE naming a configuration whose download-dir-url is that server{}",
            other.join(", "),
            if explicit {
                ", or name an item's id to publish it with -c's servers"
            } else {
                ""
            }
        ));
    }
    if !problems.is_empty() {
        bail!(
            "{} ({done} published); the files stay in the outbox",
            problems.join("; ")
        );
    }
    Ok(())
}

enum Outcome {
    Published(String),
    Held,
    Failed(String),
}

async fn publish_one(
    outbox: &Outbox,
    cache_dir: &Path,
    target: &mut Target,
    item: &Item,
) -> Outcome {
    // Claimed for the whole publish: no mount opens the item for writing meanwhile.
    let _claim = match outbox.claim(&item.id) {
        Ok(Some(c)) => c,
        Ok(None) => return Outcome::Held,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let ready = match target.ready(cache_dir).await {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(e),
    };
    match publish(&ready.client, outbox, &item.id, None, None, &|_, _| {}).await {
        Ok(p) => {
            if let Ok(v) = adopt_hashed(outbox.data_path(&item.id), p.sha, p.len) {
                let _ = ready.cache.insert_blob(v);
            }
            let _ = outbox.remove(&item.id);
            Outcome::Published(format!(
                "{}  published {} under {} ({})",
                item.id, p.name, p.key, p.sha
            ))
        }
        Err(e) => Outcome::Failed(e.to_string()),
    }
}
