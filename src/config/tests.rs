//! The option mapping and the file syntax, on whole files as SlapOS writes them.

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
    assert!(config.signature_certificates[0].starts_with("-----BEGIN CERTIFICATE-----\nMIIB8DCC"));
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
    let config =
        parse_ok("[networkcache]\ndownload-cache-url =\ndownload-binary-cache-url = http://b/\n");
    assert_eq!(config.download_cache_url.as_deref(), Some("http://b/"));
}

#[test]
fn unused_binary_url_is_not_checked_used_one_is() {
    let config = parse_ok(
        "[networkcache]\ndownload-cache-url = http://a/\ndownload-binary-cache-url = nonsense\n",
    );
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
    assert!(matches!(&err, ConfigError::Invalid { option, .. } if option == "shacache-key-file"));

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
    let err =
        parse("[networkcache]\nshadir-cert-file = c.pem\nshadir-ca-file = ca.pem\n").unwrap_err();
    let message = assert_one_line(&err);
    assert!(
        message.starts_with("test.cfg: option shadir-cert-file: "),
        "{message}"
    );
    assert!(message.contains("shadir-key-file"), "{message}");

    let err = parse("[networkcache]\nshacache-key-file = k.pem\n").unwrap_err();
    assert!(matches!(&err, ConfigError::Invalid { option, .. } if option == "shacache-key-file"));

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
    let err = parse("[networkcache]\nupload-dir-url = http://a/\n\nUpload-Dir-Url = http://b/\n")
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
