//! The `[networkcache]` configuration file (slapcache.cfg / slapos.cfg) read into plain
//! structs. This is the only module that knows option names and file syntax.
//!
//! STUB: interface fixed, implementation pending (see the helper brief).

use std::path::{Path, PathBuf};

/// Default configuration files, in the order they are tried.
pub const DEFAULT_PATHS: [&str; 2] = ["/etc/opt/slapcache.cfg", "/etc/opt/slapos/slapos.cfg"];

/// TLS files for one service (shacache or shadir).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA bundle that the server certificate must chain to (else the system roots).
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) presented to the server.
    pub cert_file: Option<PathBuf>,
    /// Key of the client certificate (PEM).
    pub key_file: Option<PathBuf>,
}

/// Everything shacachefs takes from a configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from.
    pub source: PathBuf,
    /// Download/upload bases: the plain option, else the `*-binary-*` one.
    pub download_cache_url: Option<String>,
    pub download_dir_url: Option<String>,
    pub upload_cache_url: Option<String>,
    pub upload_dir_url: Option<String>,
    /// `signature-private-key-file` (or the old `signature_private_key_file`).
    pub signature_private_key_file: Option<PathBuf>,
    /// Each trusted certificate as PEM text, `-----BEGIN CERTIFICATE-----` included.
    pub signature_certificates: Vec<String>,
    pub shacache_tls: TlsFiles,
    pub shadir_tls: TlsFiles,
    /// `[shacache] key`: slapcache's shadir key, when the file has one.
    pub slapcache_key: Option<String>,
    /// Notices about the file (obsolete options ignored, …), for the caller to log.
    pub notices: Vec<String>,
}

/// A configuration that cannot be used; the message names the file, the option and the
/// problem in one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read configuration: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: no [networkcache] section")]
    NoSection { path: PathBuf },
    #[error("{path}: option {option}: {message}")]
    Invalid {
        path: PathBuf,
        option: String,
        message: String,
    },
}

impl Config {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let _ = path;
        todo!("config::Config::load")
    }

    /// Parses configuration text; `path` is only used in messages and `source`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let _ = (text, path);
        todo!("config::Config::parse")
    }

    /// The first of [`DEFAULT_PATHS`] that exists, if any.
    pub fn find_default() -> Option<PathBuf> {
        DEFAULT_PATHS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    }
}
