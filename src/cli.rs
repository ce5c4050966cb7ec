//! Command-line definitions (clap) and nothing else: each subcommand's arguments become
//! a plain struct that `commands` takes. A mount's `-o` options and the mount(8) helper's
//! spelling are turned into [`MountArgs`] by [`mount_options`].

pub mod mount_options;

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// A SlapOS network cache (shacache + shadir) as a filesystem, and the
/// networkcache-upload / networkcache-download jobs as commands.
#[derive(Debug, Parser)]
#[command(name = "shacachefs", version, propagate_version = true)]
pub struct Cli {
    /// Log level: error, warn, info, debug, trace (RUST_LOG overrides it).
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount the cache: shadir keys as directories, entries as lazily fetched files.
    #[command(
        after_help = "Examples:\n  shacachefs mount /mnt/shacache                 # reads /etc/opt/slapcache.cfg\n  \
        ls /mnt/shacache/slapos-global-key/\n  \
        cp /mnt/shacache/slapos-global-key/latest ./slapos.tar.gz\n  \
        umount /mnt/shacache\n  \
        shacachefs mount -c ~/slapos.cfg --key my-key -f /mnt/shacache   # foreground"
    )]
    Mount(MountArgs),
    /// Run a shacache + shadir server over a directory.
    #[command(
        after_help = "Example:\n  shacachefs serve --root /srv/shacache --listen 127.0.0.1:8080\n  \
        # then: download-cache-url = http://127.0.0.1:8080/shacache\n  \
        #       download-dir-url   = http://127.0.0.1:8080/shadir"
    )]
    Serve(ServeArgs),
    /// Upload a file to shacache and publish a signed shadir entry (networkcache-upload).
    #[command(
        after_help = "Examples:\n  shacachefs upload -c /etc/opt/slapcache.cfg -f build.tar.gz -k my-key file=build.tar.gz\n  \
        shacachefs upload -c slapcache.cfg -f blob.bin            # blob only: prints its SHA-512\n  \
        find out -type f | shacachefs upload -c slapcache.cfg -k my-key --files-from -   # one entry a file"
    )]
    Upload(UploadArgs),
    /// Download the first matching entry's blob, verified (networkcache-download).
    #[command(
        after_help = "Examples:\n  shacachefs download -c slapcache.cfg -k slapos-global-key -o out.tar.gz\n  \
        shacachefs download -c slapcache.cfg -k my-key -l 'timestamp>>0'\n  \
        shacachefs download -c slapcache.cfg -k pkg 'version>=[4,2]' 'version<<Infinity'"
    )]
    Download(DownloadArgs),
    /// List a key's trusted entries.
    #[command(
        after_help = "Example:\n  shacachefs ls -c /etc/opt/slapcache.cfg slapos-global-key\n  \
        shacachefs ls --json -c slapcache.cfg my-key | jq '.[].name'"
    )]
    Ls(LsArgs),
    /// Files written into a mount that are not published yet (mounted or not).
    #[command(after_help = "Examples:\n  shacachefs outbox list\n  \
        shacachefs outbox retry -c /etc/opt/slapcache.cfg\n  \
        shacachefs outbox drop 18c2f0a1b2c3d-4e5f-0a1b2c3d")]
    Outbox(OutboxArgs),
    /// Re-hash every cached blob and remove the ones that do not match their name.
    #[command(after_help = "Example:\n  shacachefs fsck --cache-dir /var/cache/shacachefs")]
    Fsck(FsckArgs),
    /// Fetch the trusted entries of keys into the cache (mounted or not), pinned with --pin.
    #[command(
        after_help = "Examples:\n  shacachefs prefetch --latest --pin slapos-global-key   # keep it for offline use\n  \
        shacachefs prefetch -c slapcache.cfg my-key other-key     # every entry, not pinned\n  \
        setfattr -x user.shacachefs.pin /mnt/shacache/KEY/NAME    # unpin (or -n ... -v 0)"
    )]
    Prefetch(PrefetchArgs),
    /// What a running mount is doing: servers, cache, transfers, outbox.
    #[command(
        after_help = "Example:\n  shacachefs status /mnt/shacache\n  shacachefs status --json /mnt/shacache | jq .hits"
    )]
    Status(StatusArgs),
    /// Print the man page or shell completions (for packaging).
    #[command(hide = true)]
    Generate(GenerateArgs),
    /// Generate an RSA signing key and a self-signed certificate (generate-signature-key).
    #[command(
        after_help = "Example:\n  shacachefs keygen /etc/opt/slapos/signature.key \"$(hostname)\" --cert-file /etc/opt/slapos/signature.crt\n  \
        # then add the certificate to signature-certificate-list"
    )]
    Keygen(KeygenArgs),
}

/// The configuration file option shared by client commands.
#[derive(Debug, Args, Clone)]
pub struct ConfigArg {
    /// Configuration file with a [networkcache] section (default: /etc/opt/slapcache.cfg,
    /// then /etc/opt/slapos/slapos.cfg).
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory holding the store (created if missing).
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Require HTTP Basic USER:PASS for uploads (POST, PUT). Visible to every local user
    /// in the process list: prefer --upload-user-file or SHACACHEFS_UPLOAD_USER.
    #[arg(long, value_name = "USER:PASS", conflicts_with = "upload_user_file")]
    pub upload_user: Option<String>,
    /// Read USER:PASS for uploads from the first line of this file.
    #[arg(long, value_name = "FILE")]
    pub upload_user_file: Option<PathBuf>,
    /// A request's headers, and an idle keep-alive connection's next request, must arrive
    /// within this many seconds.
    #[arg(long, default_value = "30", value_name = "SECS", value_parser = parse_secs)]
    pub header_timeout: std::time::Duration,
    /// A request body that sends nothing for this many seconds is dropped (408).
    #[arg(long, default_value = "30", value_name = "SECS", value_parser = parse_secs)]
    pub body_idle_timeout: std::time::Duration,
    /// Average rate a request body must keep (bytes a second, suffixes K/M), counted
    /// from its start after a grace of --body-idle-timeout; 0 turns the check off.
    #[arg(long, default_value = "8K", value_name = "RATE", value_parser = parse_size)]
    pub body_min_rate: u64,
    /// A response the client does not read for this many seconds is dropped.
    #[arg(long, default_value = "60", value_name = "SECS", value_parser = parse_secs)]
    pub send_timeout: std::time::Duration,
    /// Open connections, all clients together (lowered to fit the open-file limit).
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub max_connections: usize,
    /// Open connections from one IPv4 address or one IPv6 /64.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_connections_per_client: usize,
    /// Uploads (POST) receiving at once; beyond, 429.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub max_uploads: usize,
    /// Serve HTTPS with this certificate (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require a client certificate signed by this CA for uploads. Checked with
    /// rustls/WebPKI: X.509 v3 certificates with ECDSA, Ed25519 or RSA-2048+ keys only
    /// (v1 certificates and RSA-1024 keys, which OpenSSL servers accept, are refused).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (a bare PORT binds 127.0.0.1).
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = crate::metrics::parse_listen)]
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The shadir key to index the upload under.
    #[arg(short = 'k', long, conflicts_with = "url")]
    pub key: Option<String>,
    /// URL of the data (downloaded unless --file is given); the key defaults to
    /// file-urlmd5:md5(URL) and the metadata gets url=URL.
    #[arg(short = 'u', long)]
    pub url: Option<String>,
    /// Upload the contents of this file. Repeat it (or use --files-from) to publish
    /// several files under one key: each entry then gets file=NAME, its own base name.
    #[arg(short = 'f', long, value_name = "FILE")]
    pub file: Vec<PathBuf>,
    /// Read more files to upload from LIST, one path a line ("-": standard input).
    #[arg(long, value_name = "LIST")]
    pub files_from: Option<PathBuf>,
    /// With several files: how many are uploaded and published at once.
    #[arg(short = 'j', long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// A JSON file holding a dictionary of metadata.
    #[arg(short = 'm', long, value_name = "FILE")]
    pub metadata: Option<PathBuf>,
    /// Extra metadata (values are strings).
    #[arg(value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
}

#[derive(Debug, Args)]
pub struct DownloadArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The shadir key.
    #[arg(
        short = 'k',
        long,
        required_unless_present = "url",
        conflicts_with = "url"
    )]
    pub key: Option<String>,
    /// URL of the data: the key is file-urlmd5:md5(URL).
    #[arg(short = 'u', long)]
    pub url: Option<String>,
    /// List the matching entries (JSON) instead of downloading the first.
    #[arg(short = 'l', long)]
    pub list: bool,
    /// Write the blob to FILE (atomically) instead of standard output.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Filters applied in order: KEY==VALUE, <=, >=, <, >, << (lowest), >> (highest);
    /// VALUE is JSON (quote strings).
    #[arg(value_name = "FILTER")]
    pub filters: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print a JSON array of {name, sha512, metadata, signer}.
    #[arg(long)]
    pub json: bool,
    /// The shadir key.
    pub key: String,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the private key (PEM, PKCS#8); never overwritten.
    pub key_file: PathBuf,
    /// The certificate's common name.
    pub common_name: String,
    /// Where to write the certificate (default: print it).
    #[arg(long, value_name = "FILE")]
    pub cert_file: Option<PathBuf>,
    /// Key size in bits.
    #[arg(long, default_value_t = 2048)]
    pub bits: usize,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Where to mount.
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub config: ConfigArg,
    /// Cache directory (default: /var/cache/shacachefs for root, else
    /// $XDG_CACHE_HOME/shacachefs).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Blob bytes kept in the cache before closed blobs are evicted (K, M, G, T suffixes).
    #[arg(long, default_value = "10G", value_name = "SIZE", value_parser = parse_size)]
    pub cache_size: u64,
    /// Seconds a key's listing is trusted before shadir is asked again.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub dir_ttl: u64,
    /// Seconds a key unknown to shadir is not asked again.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub negative_ttl: u64,
    /// A key to show at the root (repeatable); `[shacache] key` is always shown.
    #[arg(long = "key", short = 'k', value_name = "KEY")]
    pub keys: Vec<String>,
    /// Refuse to mount when no signature-certificate-list is configured.
    #[arg(long)]
    pub require_signature: bool,
    /// Stay in the foreground (otherwise the command returns once the mount is ready).
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Let other users see the mount (needs user_allow_other in /etc/fuse.conf for
    /// non-root users).
    #[arg(long)]
    pub allow_other: bool,
    /// Mount options, comma separated: ro, rw, log_level=LEVEL, and every flag as
    /// name=value or name (cache_dir=…, cache_size=…, dir_ttl=…, key=…, allow_other,
    /// require_signature, …); mount(8)'s own (_netdev, nofail, noauto, user, x-systemd.*,
    /// …) are ignored. Applied after the flags (see `cli::mount_options`).
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Vec<String>,
    /// Serve cached blobs with pread even where FUSE passthrough is possible.
    #[arg(long)]
    pub no_passthrough: bool,
    /// Where the daemon writes its log (default: nowhere once detached).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Metadata added to every entry published through the mount (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
    /// Retry pending uploads in the background (bounded backoff).
    #[arg(long)]
    pub retry_uploads: bool,
    /// Seconds without progress after which a transfer fails (an open then fails with EIO).
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub low_speed_timeout: u64,
    /// Seconds allowed to set up a connection.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub connect_timeout: u64,
    /// Largest shadir answer accepted (K, M, G suffixes).
    #[arg(long, default_value = "64M", value_name = "SIZE", value_parser = parse_size)]
    pub max_dir_body: u64,
    /// Deepest JSON nesting accepted in a shadir answer.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub max_json_depth: usize,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (a bare PORT binds 127.0.0.1).
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = crate::metrics::parse_listen)]
    pub metrics_listen: Option<SocketAddr>,
    /// Set by `-o ro` (cleared by `-o rw`).
    #[arg(skip)]
    pub options_ro: bool,
    /// Set by `-o log_level=LEVEL` (`--log-level` wins over it).
    #[arg(skip)]
    pub options_log_level: Option<String>,
}

/// Parses a positive number of seconds (`30`, `0.5`).
pub fn parse_secs(s: &str) -> Result<std::time::Duration, String> {
    let n: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("not a number of seconds: {s:?}"))?;
    if !(n > 0.0 && n <= 1e9) {
        return Err(format!("seconds out of range: {s:?}"));
    }
    Ok(std::time::Duration::from_secs_f64(n))
}

/// Parses `123`, `10K`, `512M`, `10G`, `1T` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?}")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

#[derive(Debug, Args)]
pub struct OutboxArgs {
    #[command(subcommand)]
    pub action: OutboxAction,
    /// The cache directory holding the outbox (default as for `mount`).
    #[arg(long, global = true, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum OutboxAction {
    /// List pending files.
    List {
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Publish pending files (all, or the given ids) with a configuration's servers.
    Retry {
        #[command(flatten)]
        config: ConfigArg,
        /// Item ids (default: every item meant for the configured server).
        ids: Vec<String>,
    },
    /// Delete pending files without publishing them.
    Drop {
        /// Item ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct PrefetchArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The cache directory (default as for `mount`).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Evict closed, unpinned blobs beyond SIZE to make room (default: only when the
    /// disk is short; a mount keeps its own limit).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub cache_size: Option<u64>,
    /// Only the entry `latest` points to (the newest with a numeric timestamp).
    #[arg(long)]
    pub latest: bool,
    /// Pin the blobs: never evicted, across remounts, until unpinned
    /// (`setfattr -x user.shacachefs.pin FILE` in a mount).
    #[arg(long)]
    pub pin: bool,
    /// Remove the pins of those entries instead (nothing is fetched; the blobs are then
    /// evicted like any other).
    #[arg(long, conflicts_with = "pin")]
    pub unpin: bool,
    /// The shadir keys.
    #[arg(required = true, value_name = "KEY")]
    pub keys: Vec<String>,
}

#[derive(Debug, Args)]
pub struct FsckArgs {
    /// The cache directory (default as for `mount`).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The mountpoint.
    pub mountpoint: PathBuf,
    /// Print the JSON document.
    #[arg(long)]
    pub json: bool,
    /// Redraw every second until interrupted (servers are probed at most every 5 s).
    #[arg(short = 'w', long)]
    pub watch: bool,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// `man`, or a shell: bash, zsh, fish, elvish, powershell.
    pub what: String,
}
