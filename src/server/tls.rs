//! The server's TLS configuration: a certificate and key from PEM files, and optionally
//! a CA whose client certificates are verified. Client certificates are optional at the
//! TLS level (anonymous clients may read); uploads without one are refused by `auth`.
//! The client verifier is WebPKI's: X.509 v3 client certificates only, with ECDSA,
//! Ed25519 or RSA-2048+ keys (stricter than OpenSSL-based servers; the README says so and
//! the client's error on such a refusal explains it).

use super::{ServerError, TlsOptions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

fn tls_err(what: &str, path: &Path, e: impl std::fmt::Display) -> ServerError {
    ServerError::Tls(format!("{what} {}: {e}", path.display()))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ServerError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err("reading certificates from", path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err("parsing certificates in", path, e))?;
    if certs.is_empty() {
        return Err(tls_err(
            "reading certificates from",
            path,
            "no certificate found",
        ));
    }
    Ok(certs)
}

/// Builds the acceptor (ring provider, TLS 1.2 and 1.3).
pub(crate) fn acceptor(opts: &TlsOptions) -> Result<TlsAcceptor, ServerError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = load_certs(&opts.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&opts.key_file)
        .map_err(|e| tls_err("reading the private key", &opts.key_file, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let builder = match &opts.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| tls_err("adding a client CA from", ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| tls_err("building the client verifier for", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| tls_err("using the certificate", &opts.cert_file, e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
