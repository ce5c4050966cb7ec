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
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    fn read_fixture(name: &str) -> String {
        std::fs::read_to_string(fixture(name)).expect("fixture")
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.cfg"))
    }

    fn parse_ok(text: &str) -> Config {
        parse(text).expect("valid configuration")
    }

    /// Asserts a one-line message that names the file.
    fn assert_one_line(err: &ConfigError) -> String {
        let message = err.to_string();
        assert!(!message.contains('\n'), "{message:?}");
        message
    }

    #[test]
    fn slapcache_fixture() {
        let path = fixture("config/slapcache.cfg");
        let config = Config::load(&path).expect("loads");
        assert_eq!(config.source, path);
        assert_eq!(config.slapcache_key.as_deref(), Some("slapos-global-key"));
        assert_eq!(
            config.download_cache_url.as_deref(),
            Some("http://shacache.nxdcdn.com")
        );
        assert_eq!(
            config.download_dir_url.as_deref(),
            Some("http://shadir.nxdcdn.com")
        );
        assert_eq!(config.upload_cache_url, None);
        assert_eq!(config.upload_dir_url, None);
        assert_eq!(config.signature_private_key_file, None);
        assert_eq!(config.shacache_tls, TlsFiles::default());
        assert_eq!(config.shadir_tls, TlsFiles::default());
        assert!(config.notices.is_empty(), "{:?}", config.notices);

        assert_eq!(config.signature_certificates.len(), 1);
        // The certificate is the indented block of the file, indentation stripped.
        let text = read_fixture("config/slapcache.cfg");
        let expected: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.contains(CERT_MARKER))
            .map(str::trim)
            .collect();
        assert_eq!(config.signature_certificates[0], expected.join("\n").trim());
        assert!(
            config.signature_certificates[0].starts_with("-----BEGIN CERTIFICATE-----\nMIIB8DCC")
        );
        assert!(config.signature_certificates[0].ends_with("-----END CERTIFICATE-----"));
    }

    #[test]
    fn uploader_fixture() {
        let path = fixture("config/uploader.cfg");
        let config = Config::load(&path).expect("loads");
        assert_eq!(config.slapcache_key, None);
        assert_eq!(
            config.download_cache_url.as_deref(),
            Some("https://shacache.example.org/shacache")
        );
        // Read through the ':' separator.
        assert_eq!(
            config.download_dir_url.as_deref(),
            Some("https://shacache.example.org/shadir")
        );
        // `Upload-Cache-URL`, read case-insensitively, its `%40` kept.
        assert_eq!(
            config.upload_cache_url.as_deref(),
            Some("https://uploader:p%40ss@www.shacache.example.org/shacache")
        );
        assert_eq!(
            config.upload_dir_url.as_deref(),
            Some("https://uploader:p%40ss@www.shacache.example.org/shadir")
        );
        assert_eq!(
            config.signature_private_key_file.as_deref(),
            Some(Path::new("/etc/opt/slapos/shacache/signature.key"))
        );
        let tls = TlsFiles {
            ca_file: Some("/etc/opt/slapos/shacache/ca.crt".into()),
            cert_file: Some("/etc/opt/slapos/shacache/upload.crt".into()),
            key_file: Some("/etc/opt/slapos/shacache/upload.key".into()),
        };
        assert_eq!(config.shacache_tls, tls);
        assert_eq!(config.shadir_tls, tls);

        assert_eq!(config.notices.len(), 1, "{:?}", config.notices);
        assert!(config.notices[0].contains("signature-certificate-file"));
        assert!(config.notices[0].contains("obsolete"));
        assert!(config.notices[0].contains("uploader.cfg"));

        let expected = [
            read_fixture("signature/signer-a.crt"),
            read_fixture("signature/signer-b.crt"),
        ];
        assert_eq!(config.signature_certificates.len(), 2);
        for (got, want) in config.signature_certificates.iter().zip(&expected) {
            assert_eq!(got.trim_end(), want.trim_end());
        }
    }

    #[test]
    fn binary_urls_are_used_only_where_the_plain_one_is_absent() {
        let roles = [
            "download-cache",
            "download-dir",
            "upload-cache",
            "upload-dir",
        ];
        let split = |role: &str| {
            let (a, b) = role.split_once('-').expect("role");
            format!("{a}-binary-{b}-url")
        };
        let fields = |c: &Config| {
            [
                c.download_cache_url.clone(),
                c.download_dir_url.clone(),
                c.upload_cache_url.clone(),
                c.upload_dir_url.clone(),
            ]
        };

        // Only the binary ones: used.
        let mut text = String::from("[networkcache]\n");
        for role in roles {
            text += &format!("{} = http://binary/{role}\n", split(role));
        }
        let got = fields(&parse_ok(&text));
        for (role, value) in roles.iter().zip(got) {
            assert_eq!(value, Some(format!("http://binary/{role}")));
        }

        // Both: the plain one wins, whatever the order.
        let mut text = String::from("[networkcache]\n");
        for role in roles {
            text += &format!("{} = http://binary/{role}\n", split(role));
            text += &format!("{role}-url = https://plain/{role}\n");
        }
        let got = fields(&parse_ok(&text));
        for (role, value) in roles.iter().zip(got) {
            assert_eq!(value, Some(format!("https://plain/{role}")));
        }

        // An empty plain one counts as absent.
        let config = parse_ok(
            "[networkcache]\ndownload-cache-url =\ndownload-binary-cache-url = http://b/\n",
        );
        assert_eq!(config.download_cache_url.as_deref(), Some("http://b/"));
    }

    #[test]
    fn unused_binary_url_is_not_checked_used_one_is() {
        let config =
            parse_ok("[networkcache]\ndownload-cache-url = http://a/\ndownload-binary-cache-url = nonsense\n");
        assert_eq!(config.download_cache_url.as_deref(), Some("http://a/"));

        let err = parse("[networkcache]\nupload-binary-dir-url = ftp://x/\n").unwrap_err();
        match &err {
            ConfigError::Invalid { option, .. } => assert_eq!(option, "upload-binary-dir-url"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn missing_file() {
        let path = Path::new("/nonexistent/shacachefs-test/slapcache.cfg");
        let err = Config::load(path).unwrap_err();
        assert!(matches!(&err, ConfigError::Read { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound));
        let message = assert_one_line(&err);
        assert!(
            message.contains("/nonexistent/shacachefs-test/slapcache.cfg"),
            "{message}"
        );
    }

    #[test]
    fn no_section() {
        let err = parse("[shacache]\nkey = k\n[NetworkCache-old]\nx = 1\n").unwrap_err();
        assert!(matches!(err, ConfigError::NoSection { .. }), "{err:?}");
        let message = assert_one_line(&err);
        assert!(message.starts_with("test.cfg: "), "{message}");
        assert!(message.contains("[networkcache]"), "{message}");

        assert!(matches!(parse(""), Err(ConfigError::NoSection { .. })));
    }

    #[test]
    fn empty_section_is_a_configuration_without_anything() {
        let config = parse_ok("[networkcache]\n");
        assert_eq!(
            config,
            Config {
                source: "test.cfg".into(),
                ..Config::default()
            }
        );
    }

    #[test]
    fn bad_urls_name_the_option_not_the_value() {
        for (value, what) in [
            ("ftp://user:secret@host/x", "http"),
            ("shacache.example.org/secret", "not a valid URL"),
            ("http://host/a secret", "white space"),
            ("http://[::1", "not a valid URL"),
        ] {
            let text = format!("[networkcache]\nupload-cache-url = {value}\n");
            let err = parse(&text).unwrap_err();
            match &err {
                ConfigError::Invalid { option, .. } => assert_eq!(option, "upload-cache-url"),
                other => panic!("unexpected {other:?}"),
            }
            let message = assert_one_line(&err);
            assert!(
                message.starts_with("test.cfg: option upload-cache-url: "),
                "{message}"
            );
            assert!(message.contains(what), "{message}");
            assert!(!message.contains("secret"), "{message}");
        }
    }

    #[test]
    fn empty_values_are_absent() {
        let text = "[networkcache]\n\
                    download-cache-url =\n\
                    download-dir-url = \n\
                    signature-private-key-file =\n\
                    signature-certificate-list =\n\
                    shacache-cert-file =\n\
                    shacache-key-file = /k\n\
                    shacache-key-file-unknown =\n\
                    signature-certificate-file =\n";
        let err = parse(text).unwrap_err();
        // shacache-cert-file empty: the key alone is refused.
        assert!(
            matches!(&err, ConfigError::Invalid { option, .. } if option == "shacache-key-file")
        );

        let config = parse_ok(&text.replace("shacache-key-file = /k", "shacache-key-file ="));
        assert_eq!(config.download_cache_url, None);
        assert_eq!(config.download_dir_url, None);
        assert_eq!(config.signature_private_key_file, None);
        assert!(config.signature_certificates.is_empty());
        assert_eq!(config.shacache_tls, TlsFiles::default());
        // An empty obsolete option is absent too: no notice.
        assert!(config.notices.is_empty(), "{:?}", config.notices);
    }

    #[test]
    fn crlf_line_endings() {
        let text = read_fixture("config/uploader.cfg").replace('\n', "\r\n");
        let crlf = parse_ok(&text);
        let lf = Config::load(&fixture("config/uploader.cfg")).expect("loads");
        assert_eq!(crlf.signature_certificates, lf.signature_certificates);
        assert_eq!(crlf.upload_cache_url, lf.upload_cache_url);
        assert_eq!(crlf.shadir_tls, lf.shadir_tls);
        assert!(crlf
            .signature_certificates
            .iter()
            .all(|c| !c.contains('\r') && !c.contains("\n\n")));
    }

    #[test]
    fn percent_is_literal() {
        let config = parse_ok(
            "[networkcache]\n\
             download-cache-url = http://host/%(x)s/%%/%\n\
             signature-private-key-file = %(home)s/key.pem\n\
             [shacache]\nkey = %(key)s\n",
        );
        assert_eq!(
            config.download_cache_url.as_deref(),
            Some("http://host/%(x)s/%%/%")
        );
        assert_eq!(
            config.signature_private_key_file.as_deref(),
            Some(Path::new("%(home)s/key.pem"))
        );
        assert_eq!(config.slapcache_key.as_deref(), Some("%(key)s"));
    }

    #[test]
    fn tls_certificate_and_key_come_together() {
        let err = parse("[networkcache]\nshadir-cert-file = c.pem\nshadir-ca-file = ca.pem\n")
            .unwrap_err();
        let message = assert_one_line(&err);
        assert!(
            message.starts_with("test.cfg: option shadir-cert-file: "),
            "{message}"
        );
        assert!(message.contains("shadir-key-file"), "{message}");

        let err = parse("[networkcache]\nshacache-key-file = k.pem\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { option, .. } if option == "shacache-key-file")
        );

        // A CA alone is fine (anonymous HTTPS to a private CA); relative paths stay relative.
        let config = parse_ok("[networkcache]\nshacache-ca-file = certs/ca.pem\n");
        assert_eq!(
            config.shacache_tls.ca_file.as_deref(),
            Some(Path::new("certs/ca.pem"))
        );
        assert_eq!(config.shacache_tls.cert_file, None);
    }

    #[test]
    fn private_key_spellings() {
        let config = parse_ok("[networkcache]\nsignature-private-key-file = new.key\n");
        assert_eq!(
            config.signature_private_key_file.as_deref(),
            Some(Path::new("new.key"))
        );

        let config = parse_ok(
            "[networkcache]\nsignature_private_key_file = old.key\nsignature-private-key-file = new.key\n",
        );
        assert_eq!(
            config.signature_private_key_file.as_deref(),
            Some(Path::new("new.key"))
        );
        assert_eq!(config.notices.len(), 1, "{:?}", config.notices);
        assert!(config.notices[0].contains("signature_private_key_file"));
    }

    #[test]
    fn credentials_are_removed_from_server_urls() {
        for (url, want) in [
            ("http://u:p@host:8080/shadir", "http://host:8080/shadir"),
            ("https://user@host/x?y=a@b", "https://host/x?y=a@b"),
            ("http://a:b@c@host/", "http://host/"),
            ("http://host/shadir/p@th", "http://host/shadir/p@th"),
            ("http://host", "http://host"),
            ("embedded:/var/lib/x", "embedded:/var/lib/x"),
            ("http://u:p@host", "http://host"),
        ] {
            assert_eq!(without_credentials(url), want, "{url}");
        }
    }

    #[test]
    fn certificate_list_splitting() {
        let config = parse_ok(
            "[networkcache]\n\
             signature-certificate-list = -----BEGIN CERTIFICATE-----\n  AAA\n\
             \x20 -----END CERTIFICATE-----\n\
             \x20 ; a comment\n\
             \n\
             \x20 -----BEGIN CERTIFICATE-----\n\
             \x20 -----BEGIN CERTIFICATE-----\n  BBB\n  -----END CERTIFICATE-----\n\
             other = x\n",
        );
        assert_eq!(
            config.signature_certificates,
            vec![
                "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----".to_string(),
                "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----".to_string(),
            ]
        );
    }

    #[test]
    fn options_and_sections() {
        // Unknown options ignored without notice; other sections ignored; several
        // [networkcache] headers merged; option names case-insensitive, section names not.
        let config = parse_ok(
            "[slapos]\ndownload-cache-url = http://wrong/\n\
             [networkcache]\nDOWNLOAD-CACHE-URL : http://right/\nsomething-else = 1\n\
             [NETWORKCACHE]\ndownload-dir-url = http://wrong/\n\
             [networkcache]\ndownload-dir-url = http://dir/\n",
        );
        assert_eq!(config.download_cache_url.as_deref(), Some("http://right/"));
        assert_eq!(config.download_dir_url.as_deref(), Some("http://dir/"));
        assert!(config.notices.is_empty());
    }

    #[test]
    fn repeated_known_option_is_refused() {
        let err =
            parse("[networkcache]\nupload-dir-url = http://a/\n\nUpload-Dir-Url = http://b/\n")
                .unwrap_err();
        let message = assert_one_line(&err);
        assert!(matches!(err, ConfigError::Syntax { .. }));
        assert!(message.contains("line 4"), "{message}");
        assert!(message.contains("upload-dir-url"), "{message}");

        // Repeated unknown options, or options of other sections, are not our business.
        parse_ok("[networkcache]\nx = 1\nx = 2\n[slapos]\ny = 1\ny = 2\n");
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let err = parse("[networkcache]\n# comment\ndownload-cache-url = http://a/\nbroken line\n")
            .unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }));
        let message = assert_one_line(&err);
        assert!(message.starts_with("test.cfg: line 4: "), "{message}");
    }

    #[test]
    fn invalid_utf8_is_a_syntax_error_with_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.cfg");
        std::fs::write(&path, b"[networkcache]\nx = \xff\n").expect("write");
        let err = Config::load(&path).unwrap_err();
        let message = assert_one_line(&err);
        assert!(matches!(err, ConfigError::Syntax { .. }));
        assert!(message.contains("line 2"), "{message}");
        assert!(message.contains("bad.cfg"), "{message}");
    }
}
