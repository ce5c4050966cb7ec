//! `shacachefs mount`: configuration (or the embedded default), cache, client, core,
//! then the FUSE session until unmounted, SIGINT or SIGTERM.

use super::load_config;
use crate::cache::{Cache, CacheOptions};
use crate::cli::MountArgs;
use crate::config::Config;
use crate::daemon::Notifier;
use crate::fs::{Core, FsOptions};
use crate::mount::{mount, FuseFs, MountConfig};
use crate::server::{self, RunningServer, ServerOptions};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::Duration;

pub fn default_cache_dir() -> PathBuf {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        return PathBuf::from("/var/cache/shacachefs");
    }
    match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("shacachefs"),
        _ => home().join(".cache/shacachefs"),
    }
}

fn default_data_dir() -> PathBuf {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        return PathBuf::from("/var/lib/shacachefs");
    }
    match std::env::var_os("XDG_DATA_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("shacachefs"),
        _ => home().join(".local/share/shacachefs"),
    }
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// The cache namespace of a configuration: its shadir server, identified by its URL
/// without credentials (the namespace is stored in the cache and the outbox).
pub fn namespace_of(cfg: &Config) -> String {
    crate::config::without_credentials(cfg.download_dir_url.as_deref().unwrap_or_default())
}

fn embedded_store() -> PathBuf {
    default_data_dir().join("embedded").join("store")
}

/// The namespace of the embedded default, known without starting it.
pub fn embedded_namespace() -> String {
    format!("embedded:{}", embedded_store().display())
}

/// The embedded default: a server over a local store, with a signing key made on first use.
pub async fn embedded() -> Result<(Config, RunningServer, String)> {
    let data = default_data_dir().join("embedded");
    let store = embedded_store();
    std::fs::create_dir_all(&store)
        .with_context(|| format!("cannot create {}", store.display()))?;
    let key = data.join("signing.key");
    let cert = data.join("signing.crt");
    if !key.exists() || !cert.exists() {
        let (k, c) = crate::signature::generate(2048, "shacachefs-embedded")?;
        super::keygen::write_new(&key, &k, 0o600)?;
        super::keygen::write_new(&cert, &c, 0o644)?;
    }
    let cert_pem = std::fs::read_to_string(&cert)?;
    let srv = server::start(
        "127.0.0.1:0".parse()?,
        ServerOptions {
            root: store.clone(),
            upload_user: None,
            tls: None,
        },
    )
    .await?;
    let cfg = Config {
        source: PathBuf::from("(embedded default)"),
        download_cache_url: Some(srv.cache_url()),
        download_dir_url: Some(srv.dir_url()),
        upload_cache_url: Some(srv.cache_url()),
        upload_dir_url: Some(srv.dir_url()),
        signature_private_key_file: Some(key.clone()),
        signature_certificates: vec![cert_pem],
        ..Config::default()
    };
    let about = format!(
        "no configuration given and none of {} exists: using the embedded server\n  store: {}\n  signing key: {}\n  certificate: {}\n  server: {}",
        crate::config::DEFAULT_PATHS.join(", "),
        store.display(),
        key.display(),
        cert.display(),
        srv.dir_url().trim_end_matches("/shadir"),
    );
    eprintln!("shacachefs: {about}");
    Ok((cfg, srv, embedded_namespace()))
}

/// Runs the mount. `args` has its `-o` options applied already
/// (`cli::mount_options::parse_command_line`). `notifier` is the detached child's pipe to
/// the waiting parent.
pub async fn run(args: MountArgs, notifier: Option<Notifier>) -> Result<()> {
    raise_nofile_limit();
    let result = start(&args).await;
    let (session_parts, note) = match result {
        Ok(v) => v,
        Err(e) => {
            if let Some(n) = notifier {
                n.fail(&super::error_line(&e));
            }
            return Err(e);
        }
    };
    let (session, core, _server) = session_parts;
    let message = format!("shacachefs: mounted on {}{note}", args.mountpoint.display());
    match notifier {
        Some(n) => {
            n.ready(&message);
            let _ = crate::daemon::redirect_std(args.log_file.as_deref());
        }
        None => eprintln!("{message}"),
    }
    crate::daemon::sd_notify("READY=1");
    let mut session = session;
    let mut unmounter = session.unmount_callable();
    let mountpoint = args.mountpoint.clone();
    tokio::spawn(async move {
        super::serve::shutdown_signal().await;
        tracing::info!("signal received: unmounting {}", mountpoint.display());
        crate::daemon::sd_notify("STOPPING=1");
        if let Err(e) = unmounter.unmount() {
            tracing::error!("unmount {}: {e}", mountpoint.display());
        }
    });
    let ran = tokio::task::spawn_blocking(move || session.run()).await?;
    // Releases the kernel sent as the last descriptors closed may still be publishing.
    core.settle(SETTLE_LIMIT).await;
    core.save_listings();
    if let Err(e) = core.cache().close() {
        tracing::warn!("saving cache tables: {e}");
    }
    ran.context("FUSE session")?;
    tracing::info!("unmounted {}", args.mountpoint.display());
    Ok(())
}

/// How long an unmounted daemon waits for publishes in flight before it exits (what
/// is left stays pending in the outbox). Below systemd's default stop timeout (90 s).
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// Raises the soft limit of open files to the hard one: every open file of the mount
/// may hold a descriptor of the daemon (one per cached blob, shared by its handles; one
/// per file being written), and the usual soft limit of 1024 is reached by ordinary
/// builds. Logged either way.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the structure it is given or fails.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(
            "cannot read the open-file limit: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    if lim.rlim_cur >= lim.rlim_max {
        tracing::info!("open-file limit: {}", lim.rlim_cur);
        return;
    }
    let old = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads the structure it is given; raising the soft limit up to
    // the hard one needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        tracing::warn!(
            "cannot raise the open-file limit from {old} to {}: {}",
            lim.rlim_max,
            std::io::Error::last_os_error()
        );
    } else {
        tracing::info!("open-file limit raised from {old} to {}", lim.rlim_max);
    }
}

/// `--retry-uploads`: publishes pending files every 15 s while some are pending, backing
/// off (doubling to 15 min) while the servers answer but refuse or fail them. Rounds
/// that find the servers unreachable do not count: offline writes are published when
/// they come back, whenever that is. After 12 counted failures in a row it stops and
/// says so.
async fn retry_loop(core: std::sync::Arc<Core>) {
    let quick = Duration::from_secs(15);
    let mut delay = quick;
    let mut failures = 0;
    while failures < 12 {
        tokio::time::sleep(delay).await;
        if core.pending_count() == 0 {
            delay = quick;
            continue;
        }
        let (ok, failed) = core.retry_pending().await;
        if ok > 0 || failed > 0 {
            tracing::info!("retrying pending uploads: {ok} published, {failed} failed");
        }
        delay = if failed == 0 || core.known_unreachable() {
            quick
        } else {
            failures += 1;
            (delay * 2).min(Duration::from_secs(900))
        };
        if failed == 0 {
            failures = 0;
        }
    }
    tracing::warn!(
        "stopped retrying pending uploads after 12 failed rounds; use `shacachefs outbox retry`"
    );
}

/// The configuration to use: `-c`, else a default file, else the embedded default
/// (whose server is then running). Also the cache namespace it implies.
pub(super) async fn resolve_config(
    explicit: Option<PathBuf>,
) -> Result<(Config, Option<RunningServer>, String)> {
    match explicit.or_else(Config::find_default) {
        Some(path) => {
            let cfg = load_config(Some(&path))?;
            let ns = namespace_of(&cfg);
            Ok((cfg, None, ns))
        }
        None => {
            let (cfg, srv, ns) = embedded().await?;
            Ok((cfg, Some(srv), ns))
        }
    }
}

type Started = (
    (
        fuser::Session<FuseFs>,
        std::sync::Arc<Core>,
        Option<RunningServer>,
    ),
    String,
);

async fn start(args: &MountArgs) -> Result<Started> {
    if !args.mountpoint.exists() {
        std::fs::create_dir_all(&args.mountpoint).with_context(|| {
            format!("cannot create the mountpoint {}", args.mountpoint.display())
        })?;
        eprintln!(
            "shacachefs: created the mountpoint {}",
            args.mountpoint.display()
        );
    }
    let (cfg, server, namespace) = resolve_config(args.config.config.clone()).await?;
    let limits = crate::remote::Limits {
        connect_timeout: Duration::from_secs(args.connect_timeout.max(1)),
        low_speed_timeout: Duration::from_secs(args.low_speed_timeout.max(1)),
        max_dir_body: args.max_dir_body,
        max_json_depth: args.max_json_depth.max(2),
        ..crate::remote::Limits::default()
    };
    let client = super::client_with(&cfg, limits)?;
    if !client.store.can_download() {
        bail!(
            "{}: download-cache-url and download-dir-url are required to mount",
            cfg.source.display()
        );
    }
    if client.verifier.is_empty() {
        if args.require_signature {
            bail!(
                "{}: no signature-certificate-list, and --require-signature was given",
                cfg.source.display()
            );
        }
        eprintln!(
            "shacachefs: WARNING: {} has no signature-certificate-list: every entry is shown UNVERIFIED",
            cfg.source.display()
        );
    }
    let extra_meta = super::upload::collect_metadata(None, &args.meta)?;
    let writable = if args.options_ro {
        false
    } else if !client.store.can_upload() {
        eprintln!("shacachefs: no upload-cache-url/upload-dir-url: the mount is read-only");
        false
    } else if !client.verifier.is_empty() && client.signer.is_none() {
        eprintln!(
            "shacachefs: certificates are configured but no signature-private-key-file: the mount is read-only (unsigned uploads would be invisible)"
        );
        false
    } else {
        if client.signer.is_none() {
            eprintln!("shacachefs: no signature-private-key-file: entries written here are published UNSIGNED");
        }
        true
    };
    let cache_dir = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let cache = Cache::open(CacheOptions {
        dir: cache_dir.clone(),
        max_bytes: args.cache_size,
        namespace: namespace.clone(),
    })?;
    let mut keys = args.keys.clone();
    if let Some(k) = &cfg.slapcache_key {
        keys.push(k.clone());
    }
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let core = Core::new(
        client,
        cache,
        FsOptions {
            dir_ttl: Duration::from_secs(args.dir_ttl),
            negative_ttl: Duration::from_secs(args.negative_ttl),
            keys,
            uid,
            gid,
            // Below `serve`'s default cap of 64 connections per client, which answers
            // 503 past it (a cold 20,000-entry listing retried 11-22 probes each time).
            probe_concurrency: 32,
            writable,
            extra_meta,
            namespace,
            servers: [
                ("download-cache-url", &cfg.download_cache_url),
                ("download-dir-url", &cfg.download_dir_url),
                ("upload-cache-url", &cfg.upload_cache_url),
                ("upload-dir-url", &cfg.upload_dir_url),
            ]
            .into_iter()
            .filter_map(|(r, u)| u.clone().map(|u| (r.to_string(), u)))
            .collect(),
        },
    );
    let metrics_note = match args.metrics_listen {
        Some(addr) => {
            let render =
                crate::metrics::render_registry(crate::metrics::mount_registry(core.clone()));
            let bound = crate::metrics::start(addr, render)
                .await
                .with_context(|| format!("--metrics-listen {addr}"))?;
            format!(", metrics on http://{bound}/metrics")
        }
        None => String::new(),
    };
    let fs = FuseFs::new(
        core.clone(),
        tokio::runtime::Handle::current(),
        !args.no_passthrough,
    );
    let session = mount(
        fs,
        &MountConfig {
            mountpoint: args.mountpoint.clone(),
            allow_other: args.allow_other,
            read_only: !writable,
        },
    )?;
    core.set_invalidator(crate::mount::notice_thread(session.notifier()));
    if args.retry_uploads && writable {
        tokio::spawn(retry_loop(core.clone()));
    }
    let note = format!(
        " (cache {}, {}{metrics_note})",
        cache_dir.display(),
        if writable { "writable" } else { "read-only" }
    );
    Ok(((session, core, server), note))
}
