//! Upload credentials as SlapOS users have them (issue 15): an X.509 **v1** client
//! certificate with an **RSA-1024** key, and the usual v3 / RSA-2048 pair, used by
//! `upload`, `download` and a real mount (`cp` in and out) against a TLS server as
//! permissive as the OpenSSL-based production ones.
//!
//! That server is `tests/fixtures/tls/proxy.py`: Python's `ssl` (OpenSSL at
//! `@SECLEVEL=0`) terminating TLS, recording each connection's client certificate, and
//! forwarding to two plain `serve` backends over one store: connections with a verified
//! client certificate reach the one that accepts uploads, the others one that refuses them.
//! `serve --client-ca` itself stays strict (rustls/WebPKI): the last test shows what it
//! refuses and that the client's error says why.
//!
//! The PKI is made per test in Rust (`support::pki`, no `openssl` command). The mount
//! test runs as root with /dev/fuse.

use crate::support;

use shacachefs::server::TlsOptions;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use support::*;

/// Which client credentials a test uses.
#[derive(Debug, Clone, Copy)]
enum Creds {
    /// A PKCS#1 RSA-1024 key and an X.509 v1 certificate (no extensions).
    LegacyV1Rsa1024,
    /// RSA-2048 (PKCS#8) + a v3 certificate with clientAuth.
    ModernV3Rsa2048,
}

impl Creds {
    fn name(self) -> &'static str {
        match self {
            Creds::LegacyV1Rsa1024 => "legacy",
            Creds::ModernV3Rsa2048 => "modern",
        }
    }
}

/// A CA (RSA-2048, v3), a server certificate for 127.0.0.1 and both client identities.
struct Pki {
    pki: support::pki::Pki,
}

/// The X.509 version (1 or 3) and RSA key size of the certificate in `pem`.
fn version_and_bits(pem: &Path) -> (u8, usize) {
    use der::DecodePem;
    use rsa::traits::PublicKeyParts;
    let text = std::fs::read_to_string(pem).unwrap();
    let cert = x509_cert::Certificate::from_pem(&text).unwrap();
    let version = match cert.tbs_certificate.version {
        x509_cert::certificate::Version::V1 => 1,
        x509_cert::certificate::Version::V2 => 2,
        x509_cert::certificate::Version::V3 => 3,
    };
    let spki = der::Encode::to_der(&cert.tbs_certificate.subject_public_key_info).unwrap();
    let key =
        <rsa::RsaPublicKey as rsa::pkcs8::DecodePublicKey>::from_public_key_der(&spki).unwrap();
    (version, key.n().bits())
}

impl Pki {
    fn make() -> Pki {
        let pki = support::pki::Pki::new("tls_client test CA");
        pki.server("server")
            // The legacy client: a PKCS#1 RSA-1024 key, a v1 certificate.
            .v1_client("legacy", "legacy uploader", 1024)
            // The modern client: RSA-2048 (PKCS#8), v3.
            .client("modern", "modern uploader");
        // The premises, checked: what the test claims to use is what it uses.
        assert_eq!(version_and_bits(&pki.path("legacy.pem")), (1, 1024));
        assert_eq!(version_and_bits(&pki.path("modern.pem")), (3, 2048));
        let key = std::fs::read_to_string(pki.path("legacy.key")).unwrap();
        assert!(key.starts_with("-----BEGIN RSA PRIVATE KEY-----"), "{key}");
        Pki { pki }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.pki.path(name)
    }

    fn cert(&self, creds: Creds) -> PathBuf {
        self.path(&format!("{}.pem", creds.name()))
    }

    fn key(&self, creds: Creds) -> PathBuf {
        self.path(&format!("{}.key", creds.name()))
    }

    /// The DER of a client certificate, as hex (what the proxy records).
    fn cert_der_hex(&self, creds: Creds) -> String {
        let pem = std::fs::read(self.cert(creds)).unwrap();
        let der = rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .unwrap()
            .unwrap();
        hex::encode(der.as_ref())
    }

    /// `[networkcache]` for `base` (https://127.0.0.1:PORT) with the CA, and the client
    /// identity `creds` when given, for both services; entries signed by fixture signer A.
    fn config(&self, base: &str, creds: Option<Creds>) -> NetworkcacheConfig {
        let mut c =
            NetworkcacheConfig::for_urls(&format!("{base}/shacache"), &format!("{base}/shadir"))
                .signer_a();
        for service in ["shacache", "shadir"] {
            let ca = self.path("ca.pem");
            c.extra
                .push((format!("{service}-ca-file"), ca.display().to_string()));
            if let Some(creds) = creds {
                c.extra.push((
                    format!("{service}-cert-file"),
                    self.cert(creds).display().to_string(),
                ));
                c.extra.push((
                    format!("{service}-key-file"),
                    self.key(creds).display().to_string(),
                ));
            }
        }
        c
    }
}

/// The OpenSSL-based front (tests/fixtures/tls/proxy.py) and its two backends. Killed
/// when dropped.
struct OpensslFront {
    child: Child,
    port: u16,
    log: PathBuf,
    // Backends: the one for certified connections, the one that refuses uploads.
    _with_cert: Server,
    _without_cert: Server,
    _dir: tempfile::TempDir,
}

impl OpensslFront {
    /// `client_sigalgs`: the only signatures the front asks client certificates for
    /// (OpenSSL's `ClientSignatureAlgorithms`, through an `OPENSSL_CONF` file, as Python's
    /// `ssl` has no call for it), e.g. `RSA+SHA256` for PKCS#1 v1.5 only.
    fn start(pki: &Pki, max_tls12: bool, client_sigalgs: Option<&str>) -> OpensslFront {
        let with_cert = Server::start();
        let store = with_cert.store();
        let without_cert = Server::builder()
            .root(&store)
            .upload_user("not-a-client", "no-certificate")
            .start();
        let dir = tempdir();
        let log = dir.path().join("connections.jsonl");
        let hostport = |url: String| {
            url.trim_start_matches("http://")
                .trim_end_matches("/shacache")
                .to_string()
        };
        let mut cmd = Command::new("python3");
        cmd.arg(fixture("tls/proxy.py"))
            .arg("--cert")
            .arg(pki.path("server.pem"))
            .arg("--key")
            .arg(pki.path("server.key"))
            .arg("--ca")
            .arg(pki.path("ca.pem"))
            .arg("--with-cert")
            .arg(hostport(with_cert.cache_url()))
            .arg("--without-cert")
            .arg(hostport(without_cert.cache_url()))
            .arg("--log")
            .arg(&log)
            .arg("--lifetime")
            .arg("300");
        if max_tls12 {
            cmd.arg("--max-tls12");
        }
        if let Some(algs) = client_sigalgs {
            let conf = dir.path().join("openssl.cnf");
            std::fs::write(
                &conf,
                format!(
                    "openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n\
                     [ssl_sect]\nsystem_default = system_default_sect\n\
                     [system_default_sect]\nClientSignatureAlgorithms = {algs}\n"
                ),
            )
            .unwrap();
            cmd.env("OPENSSL_CONF", conf);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("python3 is needed for these tests");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("proxy.py printed {line:?}, not its port"));
        OpensslFront {
            child,
            port,
            log,
            _with_cert: with_cert,
            _without_cert: without_cert,
            _dir: dir,
        }
    }

    fn base(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Each connection: (TLS version, client certificate DER hex or None).
    fn connections(&self) -> Vec<(String, Option<String>)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["tls"].as_str().unwrap_or_default().to_string(),
                    v["client_cert"].as_str().map(str::to_string),
                )
            })
            .collect()
    }

    /// How many connections presented the certificate whose DER is `der_hex`.
    fn presented(&self, der_hex: &str) -> usize {
        self.connections()
            .iter()
            .filter(|(_, c)| c.as_deref() == Some(der_hex))
            .count()
    }
}

impl Drop for OpensslFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn upload(cfg: &Path, file: &Path, key: &str, name: &str) -> Output {
    run(shacachefs([
        "upload".as_ref(),
        "-c".as_ref(),
        cfg.as_os_str(),
        "-f".as_ref(),
        file.as_os_str(),
        "-k".as_ref(),
        key.as_ref(),
        format!("file={name}").as_ref(),
    ]))
}

fn download(cfg: &Path, key: &str, name: &str, out: &Path) -> Output {
    run(shacachefs([
        "download".as_ref(),
        "-c".as_ref(),
        cfg.as_os_str(),
        "-k".as_ref(),
        key.as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
        format!("file==\"{name}\"").as_ref(),
    ]))
}

/// `upload` and `download` with `creds` through the OpenSSL front; the front saw the
/// certificate; an upload without a certificate is refused there.
fn upload_and_download(pki: &Pki, front: &OpensslFront, creds: Creds, work: &Path) -> PathBuf {
    let cfg = pki
        .config(&front.base(), Some(creds))
        .write(work, "with-cert.cfg");
    let data = pseudo_random_bytes(300_000, 15);
    let src = work.join("a.bin");
    std::fs::write(&src, &data).unwrap();
    upload(&cfg, &src, "tls-key", "a.bin").assert_success();
    let der = pki.cert_der_hex(creds);
    let after_upload = front.presented(&der);
    assert!(
        after_upload >= 1,
        "the server saw no client certificate: {:?}",
        front.connections()
    );
    let out = work.join("a.out");
    download(&cfg, "tls-key", "a.bin", &out).assert_success();
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert!(front.presented(&der) > after_upload);

    // The same front refuses an upload from a client without a certificate.
    let anon = pki.config(&front.base(), None).write(work, "anonymous.cfg");
    let other = work.join("other.bin");
    std::fs::write(&other, b"no certificate, no upload").unwrap();
    let refused = upload(&anon, &other, "tls-key", "other.bin");
    refused.assert_failure();
    assert!(
        refused.stderr_text().contains("refused"),
        "{}",
        refused.describe()
    );
    assert!(
        front.connections().iter().any(|(_, c)| c.is_none()),
        "{:?}",
        front.connections()
    );
    cfg
}

// ---------------------------------------------------------------------------------------
// A real mount.

fn cp(from: &Path, to: &Path) -> Output {
    let mut cmd = Command::new("cp");
    cmd.arg(from).arg(to);
    run(cmd)
}

/// Through a mount with `creds`: `cp` a published file out, `cp` a new one in (10 MiB, so
/// its upload starts while it is written), then `download` it back.
fn mount_round_trip(front: &OpensslFront, creds_der: &str, cfg: &Path, work: &Path) {
    let before = front.presented(creds_der);
    let m = Mount::in_dir(cfg, work, &["-k", "tls-key"]);
    let out = work.join("a.via-mount");
    cp(&m.mountpoint.join("tls-key/a.bin"), &out).assert_success();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(work.join("a.bin")).unwrap()
    );
    let data = pseudo_random_bytes(10 << 20, 16);
    let src = work.join("b.bin");
    std::fs::write(&src, &data).unwrap();
    let copied = cp(&src, &m.mountpoint.join("tls-key/b.bin"));
    assert!(
        copied.success(),
        "{}\nmount log:\n{}",
        copied.describe(),
        m.log_text()
    );
    drop(m);
    let back = work.join("b.out");
    download(cfg, "tls-key", "b.bin", &back).assert_success();
    assert!(std::fs::read(&back).unwrap() == data, "b.bin differs");
    assert!(
        front.presented(creds_der) > before + 1,
        "the mount's connections did not present the certificate: {:?}",
        front.connections()
    );
}

#[test]
fn legacy_v1_rsa1024_credentials_upload_download_and_mount() {
    let pki = Pki::make();
    let front = OpensslFront::start(&pki, false, None);
    let work = tempdir();
    let cfg = upload_and_download(&pki, &front, Creds::LegacyV1Rsa1024, work.path());
    mount_round_trip(
        &front,
        &pki.cert_der_hex(Creds::LegacyV1Rsa1024),
        &cfg,
        work.path(),
    );
    assert!(
        front.connections().iter().all(|(v, _)| v == "TLSv1.3"),
        "{:?}",
        front.connections()
    );
}

#[test]
fn modern_v3_rsa2048_credentials_upload_download_and_mount() {
    let pki = Pki::make();
    let front = OpensslFront::start(&pki, false, None);
    let work = tempdir();
    let cfg = upload_and_download(&pki, &front, Creds::ModernV3Rsa2048, work.path());
    mount_round_trip(
        &front,
        &pki.cert_der_hex(Creds::ModernV3Rsa2048),
        &cfg,
        work.path(),
    );
}

/// TLS 1.2 signs the handshake differently (the server's CertificateRequest list, PKCS#1
/// allowed): the legacy credentials work there too.
#[test]
fn legacy_credentials_over_tls12() {
    let pki = Pki::make();
    let front = OpensslFront::start(&pki, true, None);
    let work = tempdir();
    upload_and_download(&pki, &front, Creds::LegacyV1Rsa1024, work.path());
    let conns = front.connections();
    assert!(conns.iter().all(|(v, _)| v == "TLSv1.2"), "{conns:?}");
}

/// A server that takes only PKCS#1 v1.5 / SHA-256 client signatures (TLS 1.2) gets one
/// from the RSA-1024 key. The control: a server that takes only ECDSA gets no certificate
/// from an RSA key (the upload is refused there) and the client says why in its log.
#[test]
fn legacy_key_signs_pkcs1_when_that_is_all_the_server_takes() {
    let pki = Pki::make();
    let work = tempdir();
    let pkcs1_only = OpensslFront::start(&pki, true, Some("RSA+SHA256"));
    upload_and_download(&pki, &pkcs1_only, Creds::LegacyV1Rsa1024, work.path());

    let ecdsa_only = OpensslFront::start(&pki, true, Some("ECDSA+SHA256"));
    let cfg = pki
        .config(&ecdsa_only.base(), Some(Creds::LegacyV1Rsa1024))
        .write(work.path(), "ecdsa-only.cfg");
    let src = work.path().join("c.bin");
    std::fs::write(&src, b"an RSA key cannot sign for an ECDSA-only server").unwrap();
    let refused = upload(&cfg, &src, "tls-key", "c.bin");
    refused.assert_failure();
    assert!(
        refused
            .stderr_text()
            .contains("accepts no signature this key can make"),
        "{}",
        refused.describe()
    );
    let conns = ecdsa_only.connections();
    assert!(
        !conns.is_empty() && conns.iter().all(|(_, c)| c.is_none()),
        "{conns:?}"
    );
}

/// `serve --client-ca` checks client certificates with rustls/WebPKI: v3 certificates with
/// RSA-2048 (or EC) keys only. The legacy credentials are refused there, and the client's
/// error says why; the modern ones work.
#[test]
fn serve_client_ca_accepts_v3_only_and_the_client_error_says_so() {
    let pki = Pki::make();
    let server = Server::builder()
        .tls(TlsOptions {
            cert_file: pki.path("server.pem"),
            key_file: pki.path("server.key"),
            client_ca_file: Some(pki.path("ca.pem")),
        })
        .start();
    let base = server.cache_url().trim_end_matches("/shacache").to_string();
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");
    let work = tempdir();
    let src = work.path().join("a.bin");
    std::fs::write(&src, b"to a strict server").unwrap();

    let legacy = pki
        .config(&base, Some(Creds::LegacyV1Rsa1024))
        .write(work.path(), "legacy.cfg");
    let refused = upload(&legacy, &src, "strict", "a.bin");
    refused.assert_failure();
    let err = refused.stderr_text();
    assert!(
        err.contains("refused the TLS client certificate") && err.contains("X.509 v3"),
        "{}",
        refused.describe()
    );

    let modern = pki
        .config(&base, Some(Creds::ModernV3Rsa2048))
        .write(work.path(), "modern.cfg");
    upload(&modern, &src, "strict", "a.bin").assert_success();
    let out = work.path().join("a.out");
    download(&modern, "strict", "a.bin", &out).assert_success();
    assert_eq!(std::fs::read(&out).unwrap(), b"to a strict server");
}
