//! The rustls client configuration of one service (shacache or shadir): which server
//! certificates are trusted (the configured CA file, else the system's roots) and which
//! client certificate is presented. Built here, handed to reqwest as is.
//!
//! The crypto provider is always ring, passed explicitly: nothing depends on a
//! process-wide default provider being installed.

use super::{identity, RemoteError};
use crate::config::TlsFiles;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

/// The TLS configuration for one service. `needs_roots` is false when the service has no
/// `https` URL at all: the system roots are then not loaded (nothing would use them).
pub(crate) fn client_config(
    service: &str,
    files: &TlsFiles,
    needs_roots: bool,
) -> Result<ClientConfig, RemoteError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| RemoteError::Tls(format!("{service}: {e}")))?;

    let roots = match &files.ca_file {
        Some(ca) => roots_from_file(service, ca)?,
        None if needs_roots => system_roots(service),
        None => RootCertStore::empty(),
    };
    let builder = builder.with_root_certificates(roots);

    let mut config = match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(service, cert)?;
            let key = read_key(service, key)?;
            // Not `with_client_auth_cert`: it validates our own certificate with WebPKI
            // (refusing X.509 v1) and loads the key with ring only (refusing RSA under
            // 2048 bits). See `identity`.
            let (certified, described) =
                identity::certified_key(chain, key, &provider).map_err(|e| {
                    RemoteError::Tls(format!(
                        "{service}: client certificate {} with key {}: {e}",
                        cert.display(),
                        key_path_display(&files.key_file)
                    ))
                })?;
            tracing::debug!(%service, certificate = %described, "client certificate loaded");
            builder.with_client_cert_resolver(Arc::new(identity::ConfiguredCert::new(
                service, certified, described,
            )))
        }
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => {
            return Err(RemoteError::Tls(format!(
                "{service}: a client certificate file is configured without its key file"
            )))
        }
        (None, Some(_)) => {
            return Err(RemoteError::Tls(format!(
                "{service}: a client key file is configured without its certificate file"
            )))
        }
    };
    // reqwest leaves ALPN alone on a preconfigured config; offer HTTP/2 where the server
    // speaks it (one multiplexed connection), HTTP/1.1 otherwise.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// What to add to a connection error when the server refused our client certificate (a
/// fatal alert about it), or `None`. Servers differ in what they accept: saying which is
/// the difference between a lost afternoon and a config fix.
pub(crate) fn refusal_hint(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use rustls::AlertDescription as A;
    let alert = find_alert(e)?;
    Some(match alert {
        A::CertificateRequired => {
            "the server requires a TLS client certificate: set shacache-cert-file and \
             shacache-key-file (shadir-cert-file and shadir-key-file for shadir)"
        }
        A::BadCertificate
        | A::UnsupportedCertificate
        | A::CertificateUnknown
        | A::UnknownCA
        | A::DecryptError
        | A::AccessDenied
        | A::CertificateExpired
        | A::CertificateRevoked => {
            "the server refused the TLS client certificate (shacache-cert-file/-key-file, \
             shadir-cert-file/-key-file). Servers that check client certificates with \
             rustls/WebPKI, `shacachefs serve --client-ca` among them, accept only X.509 v3 \
             certificates issued by their CA, with an ECDSA, Ed25519 or RSA key of 2048 bits \
             or more; OpenSSL-based servers (the production shacache) also accept X.509 v1 \
             certificates and RSA-1024 keys"
        }
        _ => return None,
    })
}

/// The fatal alert a server sent, anywhere in the error's chain (rustls errors travel
/// inside `io::Error`s, whose `source` skips them).
fn find_alert(e: &(dyn std::error::Error + 'static)) -> Option<rustls::AlertDescription> {
    let mut next = Some(e);
    while let Some(err) = next {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::AlertReceived(a)) = tls {
            return Some(*a);
        }
        next = err.source();
    }
    None
}

fn key_path_display(p: &Option<std::path::PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn open(service: &str, what: &str, path: &Path) -> Result<BufReader<File>, RemoteError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|e| RemoteError::Tls(format!("{service}: {what} {}: {e}", path.display())))
}

fn read_certs(service: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, RemoteError> {
    let mut r = open(service, "certificate file", path)?;
    let certs = rustls_pemfile::certs(&mut r)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            RemoteError::Tls(format!(
                "{service}: certificate file {}: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(RemoteError::Tls(format!(
            "{service}: no PEM certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_key(service: &str, path: &Path) -> Result<PrivateKeyDer<'static>, RemoteError> {
    let mut r = open(service, "key file", path)?;
    match rustls_pemfile::private_key(&mut r) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(RemoteError::Tls(format!(
            "{service}: no PEM private key in {}",
            path.display()
        ))),
        Err(e) => Err(RemoteError::Tls(format!(
            "{service}: key file {}: {e}",
            path.display()
        ))),
    }
}

fn roots_from_file(service: &str, path: &Path) -> Result<RootCertStore, RemoteError> {
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(read_certs(service, path)?);
    if added == 0 {
        return Err(RemoteError::Tls(format!(
            "{service}: no usable CA certificate in {}",
            path.display()
        )));
    }
    if ignored > 0 {
        tracing::warn!(%service, file = %path.display(), ignored, "CA certificates skipped");
    }
    Ok(roots)
}

/// The system's trust store (the distribution bundle, or `SSL_CERT_FILE`/`SSL_CERT_DIR`
/// as `rustls-native-certs` reads them). An empty store is not fatal here: plain HTTP may
/// be all that is used, and an HTTPS call will then fail with a clear TLS error.
fn system_roots(service: &str) -> RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(%service, error = %e, "loading the system CA certificates");
    }
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!(
            %service,
            "no system CA certificate found: HTTPS servers cannot be verified (set a CA file)"
        );
    }
    roots
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_config_offers_h2_and_http11() {
        let c = client_config("shacache", &TlsFiles::default(), false).unwrap();
        assert_eq!(c.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(!c.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn half_a_client_identity_is_refused() {
        let files = TlsFiles {
            cert_file: Some("/nonexistent/cert.pem".into()),
            ..TlsFiles::default()
        };
        let err = client_config("shadir", &files, false).unwrap_err();
        assert!(err.to_string().contains("without its key"), "{err}");
    }

    #[test]
    fn client_identity_and_ca_file_load() {
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/signature");
        let files = TlsFiles {
            ca_file: Some(fixtures.join("signer-a.crt")),
            cert_file: Some(fixtures.join("signer-b.crt")),
            key_file: Some(fixtures.join("signer-b.key")),
        };
        let c = client_config("shacache", &files, true).unwrap();
        assert!(c.client_auth_cert_resolver.has_certs());
    }

    fn tls_fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
    }

    /// The credentials of issue 15: an X.509 v1 certificate and an RSA-1024 key (PKCS#1).
    /// OpenSSL-based servers accept them; the set-up must not refuse them first.
    #[test]
    fn a_v1_certificate_with_an_rsa_1024_key_loads() {
        let files = TlsFiles {
            cert_file: Some(tls_fixture("legacy-v1.crt")),
            key_file: Some(tls_fixture("legacy-rsa1024.key")),
            ..TlsFiles::default()
        };
        let c = client_config("shacache", &files, false).unwrap();
        assert!(c.client_auth_cert_resolver.has_certs());
    }

    /// A v1 certificate with a key ring signs with (RSA-2048): the certificate alone was
    /// refused before ("UnsupportedCertVersion").
    #[test]
    fn a_v1_certificate_with_an_rsa_2048_key_loads() {
        let files = TlsFiles {
            cert_file: Some(tls_fixture("v1-rsa2048.crt")),
            key_file: Some(tls_fixture("v1-rsa2048.key")),
            ..TlsFiles::default()
        };
        let c = client_config("shadir", &files, false).unwrap();
        assert!(c.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn a_refused_client_certificate_is_explained() {
        use rustls::AlertDescription as A;
        let wrapped = |a: A| std::io::Error::other(rustls::Error::AlertReceived(a));
        for a in [
            A::BadCertificate,
            A::UnsupportedCertificate,
            A::DecryptError,
            A::UnknownCA,
        ] {
            let hint = refusal_hint(&wrapped(a)).unwrap_or_else(|| panic!("{a:?}"));
            assert!(hint.contains("X.509 v3"), "{hint}");
        }
        let hint = refusal_hint(&rustls::Error::AlertReceived(A::CertificateRequired)).unwrap();
        assert!(hint.contains("shacache-cert-file"), "{hint}");
        // Not about our certificate: nothing added.
        assert!(refusal_hint(&wrapped(A::HandshakeFailure)).is_none());
        assert!(refusal_hint(&std::io::Error::other("connection reset")).is_none());
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/signature");
        let files = TlsFiles {
            cert_file: Some(fixtures.join("signer-b.crt")),
            key_file: Some(tls_fixture("legacy-rsa1024.key")),
            ..TlsFiles::default()
        };
        let err = client_config("shadir", &files, false).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        let files = TlsFiles {
            cert_file: Some(tls_fixture("legacy-v1.crt")),
            key_file: Some(fixtures.join("signer-b.key")),
            ..TlsFiles::default()
        };
        let err = client_config("shadir", &files, false).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn missing_ca_file_names_the_file() {
        let files = TlsFiles {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsFiles::default()
        };
        let err = client_config("shacache", &files, true).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let files = TlsFiles {
            ca_file: Some(ca),
            ..TlsFiles::default()
        };
        assert!(client_config("shacache", &files, true).is_err());
    }
}
