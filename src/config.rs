//! The `[networkcache]` configuration file (slapcache.cfg / slapos.cfg) read into plain
//! structs. This is the only module that knows option names and file syntax.
//!
//! The file syntax (Python `configparser` rules, parsed by rust-ini) lives in `syntax`;
//! this file maps options to fields and validates them. Values are taken literally (no
//! `%` interpolation), empty values count as absent, unknown options are ignored (SlapOS
//! files carry many), and paths are kept as written: nothing here opens the files they
//! name.

mod syntax;

use std::collections::HashMap;
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

/// The section shacachefs reads.
const SECTION: &str = "networkcache";
/// slapcache's section, for its `key` option.
const SLAPCACHE_SECTION: &str = "shacache";
/// Obsolete option, ignored with a notice.
const OBSOLETE_CERTIFICATE_FILE: &str = "signature-certificate-file";
const PRIVATE_KEY_FILE: &str = "signature-private-key-file";
const PRIVATE_KEY_FILE_OLD: &str = "signature_private_key_file";
const CERTIFICATE_LIST: &str = "signature-certificate-list";
/// Start of each certificate in `signature-certificate-list`.
const CERT_MARKER: &str = "-----BEGIN CERTIFICATE-----";

/// `[networkcache]` options this module reads: a repeated one is an error (which value
/// was meant is unknowable), a repeated unknown one is none of our business.
const KNOWN_OPTIONS: &[&str] = &[
    "download-cache-url",
    "download-dir-url",
    "upload-cache-url",
    "upload-dir-url",
    "download-binary-cache-url",
    "download-binary-dir-url",
    "upload-binary-cache-url",
    "upload-binary-dir-url",
    PRIVATE_KEY_FILE,
    PRIVATE_KEY_FILE_OLD,
    CERTIFICATE_LIST,
    "shacache-ca-file",
    "shacache-cert-file",
    "shacache-key-file",
    "shadir-ca-file",
    "shadir-cert-file",
    "shadir-key-file",
];

impl Config {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
            ConfigError::Syntax {
                path: path.to_path_buf(),
                message: format!("line {line}: not valid UTF-8"),
            }
        })?;
        Config::parse(&text, path)
    }

    /// Parses configuration text; `path` is only used in messages and `source`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let parsed = syntax::parse(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: format!("line {}: {}", e.line, e.message),
        })?;
        if let Some(d) = parsed.duplicates.iter().find(|d| duplicate_matters(d)) {
            return Err(ConfigError::Syntax {
                path: path.to_path_buf(),
                message: format!(
                    "line {}: option {} repeated in [{}] (first given on line {})",
                    d.line, d.key, d.section, d.first_line
                ),
            });
        }
        let options =
            Options::collect(&parsed.ini, SECTION).ok_or_else(|| ConfigError::NoSection {
                path: path.to_path_buf(),
            })?;
        let slapcache = Options::collect(&parsed.ini, SLAPCACHE_SECTION).unwrap_or_default();
        build(&options, &slapcache, path)
    }

    /// The first of [`DEFAULT_PATHS`] that exists, if any.
    pub fn find_default() -> Option<PathBuf> {
        DEFAULT_PATHS.iter().map(PathBuf::from).find(|p| p.exists())
    }
}

/// A server URL as it may be shown or stored: `user:password@` (any userinfo) removed,
/// everything else kept byte for byte (so a namespace without credentials keeps its
/// name). Used to identify a server in the cache, the outbox and messages.
pub fn without_credentials(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let authority_start = scheme_end + 3;
    let rest = &url[authority_start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_len].rfind('@') {
        Some(at) => format!("{}{}", &url[..authority_start], &rest[at + 1..]),
        None => url.to_string(),
    }
}

fn duplicate_matters(d: &syntax::Duplicate) -> bool {
    match d.section.as_str() {
        SECTION => KNOWN_OPTIONS.contains(&d.key.as_str()),
        SLAPCACHE_SECTION => d.key == "key",
        _ => false,
    }
}

/// The non-empty options of one section (all its headers merged), by lower-cased name.
#[derive(Default)]
struct Options(HashMap<String, String>);

impl Options {
    /// `None` when the file has no such section.
    fn collect(ini: &ini::Ini, section: &str) -> Option<Options> {
        let mut found = false;
        let mut map = HashMap::new();
        for (name, props) in ini.iter() {
            if name != Some(section) {
                continue;
            }
            found = true;
            for (key, value) in props.iter() {
                let value = value.trim();
                if !value.is_empty() {
                    // First wins; repeats of options that matter were refused already.
                    map.entry(key.to_lowercase())
                        .or_insert_with(|| value.to_string());
                }
            }
        }
        found.then_some(Options(map))
    }

    fn get(&self, option: &str) -> Option<&str> {
        self.0.get(option).map(String::as_str)
    }

    fn path(&self, option: &str) -> Option<PathBuf> {
        self.get(option).map(PathBuf::from)
    }
}

/// Maps and validates the options.
fn build(options: &Options, slapcache: &Options, path: &Path) -> Result<Config, ConfigError> {
    let mut notices = Vec::new();
    if options.get(OBSOLETE_CERTIFICATE_FILE).is_some() {
        notices.push(format!(
            "{}: option {OBSOLETE_CERTIFICATE_FILE} is obsolete and ignored \
             (trusted certificates go in {CERTIFICATE_LIST})",
            path.display()
        ));
    }

    let signature_private_key_file = match (
        options.get(PRIVATE_KEY_FILE),
        options.get(PRIVATE_KEY_FILE_OLD),
    ) {
        (Some(new), Some(old)) => {
            if new != old {
                notices.push(format!(
                    "{}: both {PRIVATE_KEY_FILE} and {PRIVATE_KEY_FILE_OLD} are set; \
                     using {PRIVATE_KEY_FILE}",
                    path.display()
                ));
            }
            Some(PathBuf::from(new))
        }
        (new, old) => new.or(old).map(PathBuf::from),
    };

    Ok(Config {
        source: path.to_path_buf(),
        download_cache_url: url_option(options, path, "download-cache-url")?,
        download_dir_url: url_option(options, path, "download-dir-url")?,
        upload_cache_url: url_option(options, path, "upload-cache-url")?,
        upload_dir_url: url_option(options, path, "upload-dir-url")?,
        signature_private_key_file,
        signature_certificates: options
            .get(CERTIFICATE_LIST)
            .map(split_certificates)
            .unwrap_or_default(),
        shacache_tls: tls_files(options, path, "shacache")?,
        shadir_tls: tls_files(options, path, "shadir")?,
        slapcache_key: slapcache.get("key").map(str::to_string),
        notices,
    })
}

/// A base URL: `plain` (e.g. `download-cache-url`), else its `*-binary-*` twin
/// (`download-binary-cache-url`). Only the one used is checked: SlapOS files may carry
/// binary URLs this program never reads.
fn url_option(options: &Options, path: &Path, plain: &str) -> Result<Option<String>, ConfigError> {
    let binary = plain.replacen('-', "-binary-", 1);
    let found = options
        .get(plain)
        .map(|v| (plain, v))
        .or_else(|| options.get(&binary).map(|v| (binary.as_str(), v)));
    let Some((option, value)) = found else {
        return Ok(None);
    };
    // The value is never echoed in messages: it may hold a password.
    if value.contains(char::is_whitespace) {
        return Err(invalid(path, option, "a URL cannot contain white space"));
    }
    let url = url::Url::parse(value)
        .map_err(|e| invalid(path, option, &format!("not a valid URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(path, option, "not an http:// or https:// URL"));
    }
    Ok(Some(value.to_string()))
}

/// `<service>-ca-file`, `-cert-file` and `-key-file`; a client certificate and its key
/// come together.
fn tls_files(options: &Options, path: &Path, service: &str) -> Result<TlsFiles, ConfigError> {
    let cert = format!("{service}-cert-file");
    let key = format!("{service}-key-file");
    let files = TlsFiles {
        ca_file: options.path(&format!("{service}-ca-file")),
        cert_file: options.path(&cert),
        key_file: options.path(&key),
    };
    match (&files.cert_file, &files.key_file) {
        (Some(_), None) => Err(invalid(
            path,
            &cert,
            &format!("set without {key}: a client certificate needs its key"),
        )),
        (None, Some(_)) => Err(invalid(
            path,
            &key,
            &format!("set without {cert}: a client key needs its certificate"),
        )),
        _ => Ok(files),
    }
}

/// Each non-empty piece between markers, stripped, with the marker put back: the rule of
/// the reference client, kept so that both read a list the same way.
fn split_certificates(list: &str) -> Vec<String> {
    list.split(CERT_MARKER)
        .map(str::trim)
        .filter(|piece| !piece.is_empty())
        .map(|piece| format!("{CERT_MARKER}\n{piece}"))
        .collect()
}

fn invalid(path: &Path, option: &str, message: &str) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_path_buf(),
        option: option.to_string(),
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests;
