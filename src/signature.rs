//! Entry signatures: RSA PKCS#1 v1.5 with SHA-1 over the exact bytes of an entry's inner
//! string, base64 encoded. Trusted signers are the public keys of the configured
//! certificates; dates, issuers and chains are deliberately ignored (production
//! certificates are self-signed RSA-1024, SHA-1 signed, some expired).
//!
//! STUB: interface fixed, implementation pending (see the helper brief).

use std::path::Path;

/// One trusted certificate, reduced to what verification needs.
#[derive(Debug, Clone)]
pub struct TrustedCert {
    /// The subject's common name (or the whole subject when it has no CN).
    pub subject: String,
    pub public_key: rsa::RsaPublicKey,
}

/// The configured trust: verifies entries against every certificate.
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    pub certs: Vec<TrustedCert>,
}

/// A signing key loaded from a PEM file (PKCS#1 or PKCS#8).
#[derive(Debug, Clone)]
pub struct Signer {
    key: rsa::RsaPrivateKey,
}

#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("{path}: cannot read key: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: not an RSA private key in PEM (PKCS#1 or PKCS#8)")]
    BadKey(String),
    #[error("invalid configuration: no trusted certificate matches the private key {0} (its uploads could never be downloaded)")]
    NoMatchingCertificate(String),
    #[error("key generation failed: {0}")]
    Keygen(String),
}

impl Verifier {
    /// Parses PEM certificates; each one that does not parse (or holds no RSA key) is
    /// skipped and described in the returned warnings.
    pub fn from_pems(pems: &[String]) -> (Verifier, Vec<String>) {
        let _ = pems;
        todo!("signature::Verifier::from_pems")
    }

    /// True when no certificate is configured (the unverified view).
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// The first certificate whose key verifies `signature_b64` over `inner`'s UTF-8
    /// bytes; `None` for an empty, malformed or non-matching signature.
    pub fn verify(&self, inner: &str, signature_b64: &str) -> Option<&TrustedCert> {
        let _ = (inner, signature_b64);
        todo!("signature::Verifier::verify")
    }

    /// True when one of the certificates holds this public key.
    pub fn trusts(&self, key: &rsa::RsaPublicKey) -> bool {
        self.certs.iter().any(|c| &c.public_key == key)
    }
}

impl Signer {
    /// Loads a PEM key file.
    pub fn load(path: &Path) -> Result<Signer, SignatureError> {
        let _ = path;
        todo!("signature::Signer::load")
    }

    /// Parses PEM text (`label` is used in messages).
    pub fn from_pem(pem: &str, label: &str) -> Result<Signer, SignatureError> {
        let _ = (pem, label);
        todo!("signature::Signer::from_pem")
    }

    /// Base64 of the RSA PKCS#1 v1.5 / SHA-1 signature of `inner`'s bytes.
    pub fn sign(&self, inner: &str) -> String {
        let _ = inner;
        todo!("signature::Signer::sign")
    }

    pub fn public_key(&self) -> rsa::RsaPublicKey {
        rsa::RsaPublicKey::from(&self.key)
    }
}

/// A new RSA key (PKCS#8 PEM) and a self-signed certificate (PEM) for `common_name`,
/// valid 100 years.
pub fn generate(bits: usize, common_name: &str) -> Result<(String, String), SignatureError> {
    let _ = (bits, common_name);
    todo!("signature::generate")
}
