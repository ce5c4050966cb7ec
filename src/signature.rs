//! Entry signatures: RSA PKCS#1 v1.5 with SHA-1 over the exact bytes of an entry's inner
//! string, base64 encoded. Trusted signers are the public keys of the configured
//! certificates; dates, issuers and chains are deliberately ignored (production
//! certificates are self-signed RSA-1024, SHA-1 signed, some expired).
//!
//! This module owns signing keys, the trusted-certificate list and key generation. The
//! certificate parsing and the self-signed certificate builder live in `signature/cert.rs`.

mod cert;
#[cfg(test)]
mod tests;

use base64::Engine as _;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::traits::PublicKeyParts;
use rsa::Pkcs1v15Sign;
use sha1::{Digest, Sha1};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One trusted certificate, reduced to what verification needs.
#[derive(Debug, Clone)]
pub struct TrustedCert {
    /// The subject's common name (or the whole subject when it has no CN); shared by
    /// every entry it verified.
    pub subject: Arc<str>,
    pub public_key: rsa::RsaPublicKey,
}

/// The configured trust: verifies entries against every certificate.
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    pub certs: Vec<TrustedCert>,
    /// Verdicts already reached, shared by clones: see [`Verifier::verify`].
    memo: Arc<Memo>,
}

/// Verdicts by a digest of (inner string, signature), for the certificate set they
/// were reached with: a listing refreshed or re-fetched after a publish verifies only
/// its new entries. Bounded: cleared when it grows past [`MEMO_MAX`].
#[derive(Debug, Default)]
struct Memo {
    /// The certificate count the verdicts hold for, and the verdicts (the index of the
    /// certificate that verified, or none).
    verdicts: Mutex<(usize, Verdicts)>,
    /// RSA verifications actually done (for tests and `status`).
    done: AtomicU64,
}

type Verdicts = HashMap<[u8; 32], Option<usize>>;

/// Verdicts remembered at most (about 50 bytes each).
const MEMO_MAX: usize = 1 << 20;

fn memo_key(inner: &str, signature_b64: &str) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update((inner.len() as u64).to_le_bytes());
    h.update(inner.as_bytes());
    h.update(signature_b64.as_bytes());
    h.finalize().into()
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

impl TrustedCert {
    /// Parses every certificate of one PEM text (usually exactly one). An error describes
    /// why nothing usable was found; a certificate that parses only leniently is accepted
    /// and described in the returned notes.
    pub fn parse_pem(pem: &str) -> Result<(Vec<TrustedCert>, Vec<String>), String> {
        cert::parse_pem(pem)
    }
}

impl Verifier {
    /// Parses PEM certificates; each one that does not parse (or holds no RSA key) is
    /// skipped and described in the returned warnings.
    pub fn from_pems(pems: &[String]) -> (Verifier, Vec<String>) {
        let mut verifier = Verifier::default();
        let mut warnings = Vec::new();
        for (i, pem) in pems.iter().enumerate() {
            match cert::parse_pem(pem) {
                Ok((certs, notes)) => {
                    warnings.extend(notes.into_iter().map(|n| {
                        format!("signature-certificate-list: certificate #{}: {n}", i + 1)
                    }));
                    verifier.certs.extend(certs);
                }
                Err(e) => warnings.push(format!(
                    "signature-certificate-list: certificate #{} of {} is unusable: {e}",
                    i + 1,
                    pems.len()
                )),
            }
        }
        (verifier, warnings)
    }

    /// True when no certificate is configured (the unverified view).
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    /// The first certificate whose key verifies `signature_b64` over `inner`'s UTF-8
    /// bytes; `None` for an empty, malformed or non-matching signature. Each (inner,
    /// signature) pair is verified once per certificate set: the verdict is remembered,
    /// keyed by a SHA-256 of both (never by the blob's name alone, so a changed
    /// signature or inner string is verified again).
    pub fn verify(&self, inner: &str, signature_b64: &str) -> Option<&TrustedCert> {
        if self.certs.is_empty() {
            return None;
        }
        let key = memo_key(inner, signature_b64);
        {
            let mut m = self.memo.verdicts.lock().unwrap_or_else(|p| p.into_inner());
            if m.0 != self.certs.len() {
                *m = (self.certs.len(), HashMap::new());
            }
            if let Some(v) = m.1.get(&key) {
                return v.and_then(|i| self.certs.get(i));
            }
        }
        self.memo.done.fetch_add(1, Ordering::Relaxed);
        let index = self.verify_uncached(inner, signature_b64);
        let mut m = self.memo.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        if m.1.len() >= MEMO_MAX {
            m.1.clear();
        }
        m.1.insert(key, index);
        index.and_then(|i| self.certs.get(i))
    }

    /// RSA verifications done so far (those answered from memory not counted).
    pub fn verifications(&self) -> u64 {
        self.memo.done.load(Ordering::Relaxed)
    }

    /// The index of the first certificate that verifies the signature.
    fn verify_uncached(&self, inner: &str, signature_b64: &str) -> Option<usize> {
        let signature = decode_signature(signature_b64)?;
        // ring's RSA is several times faster than the rsa crate's (a listing may hold
        // thousands of entries); it takes moduli of 1024 bits and more, which covers
        // every production key. Smaller keys go through the rsa crate.
        let mut hashed = None;
        self.certs.iter().position(|c| {
            if c.public_key.size() >= 128 {
                let key = ring::signature::RsaPublicKeyComponents {
                    n: c.public_key.n().to_bytes_be(),
                    e: c.public_key.e().to_bytes_be(),
                };
                key.verify(
                    &ring::signature::RSA_PKCS1_1024_8192_SHA1_FOR_LEGACY_USE_ONLY,
                    inner.as_bytes(),
                    &signature,
                )
                .is_ok()
            } else {
                let h = hashed.get_or_insert_with(|| Sha1::digest(inner.as_bytes()));
                c.public_key
                    .verify(Pkcs1v15Sign::new::<Sha1>(), h, &signature)
                    .is_ok()
            }
        })
    }

    /// True when one of the certificates holds this public key.
    pub fn trusts(&self, key: &rsa::RsaPublicKey) -> bool {
        self.certs.iter().any(|c| &c.public_key == key)
    }
}

/// Decodes a wire signature. Whitespace is dropped first because older tooling wrapped
/// base64 output in lines and Python's decoder ignores the line breaks; anything else
/// that is not canonical standard base64 makes the entry unverified.
fn decode_signature(signature_b64: &str) -> Option<Vec<u8>> {
    let compact: String = signature_b64
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    if compact.is_empty() {
        return None;
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .ok()?;
    (!bytes.is_empty()).then_some(bytes)
}

impl Signer {
    /// Loads a PEM key file.
    pub fn load(path: &Path) -> Result<Signer, SignatureError> {
        let label = path.display().to_string();
        let text = std::fs::read(path).map_err(|source| SignatureError::Read {
            path: label.clone(),
            source,
        })?;
        let text = String::from_utf8(text).map_err(|_| SignatureError::BadKey(label.clone()))?;
        Signer::from_pem(&text, &label)
    }

    /// Parses PEM text (`label` is used in messages). The first private-key block counts;
    /// other blocks (a certificate kept in the same file, comments) are ignored.
    pub fn from_pem(pem: &str, label: &str) -> Result<Signer, SignatureError> {
        let bad = || SignatureError::BadKey(label.to_string());
        let mut rest = pem.as_bytes();
        // Bounded: every iteration consumes at least one PEM section of `rest`.
        loop {
            let (item, remainder) = match rustls_pemfile::read_one_from_slice(rest) {
                Ok(Some(found)) => found,
                Ok(None) | Err(_) => return Err(bad()),
            };
            let key = match item {
                rustls_pemfile::Item::Pkcs1Key(der) => {
                    rsa::RsaPrivateKey::from_pkcs1_der(der.secret_pkcs1_der()).map_err(|_| bad())?
                }
                rustls_pemfile::Item::Pkcs8Key(der) => {
                    rsa::RsaPrivateKey::from_pkcs8_der(der.secret_pkcs8_der()).map_err(|_| bad())?
                }
                rustls_pemfile::Item::Sec1Key(_) => return Err(bad()),
                _ => {
                    rest = remainder;
                    continue;
                }
            };
            return Ok(Signer { key });
        }
    }

    /// Base64 of the RSA PKCS#1 v1.5 / SHA-1 signature of `inner`'s bytes.
    pub fn sign(&self, inner: &str) -> String {
        let hashed = Sha1::digest(inner.as_bytes());
        // The random source only blinds the private-key operation against timing
        // attacks; PKCS#1 v1.5 output stays deterministic.
        let signed =
            self.key
                .sign_with_rng(&mut rand::rngs::OsRng, Pkcs1v15Sign::new::<Sha1>(), &hashed);
        match signed {
            Ok(bytes) => base64::engine::general_purpose::STANDARD.encode(bytes),
            // Only reachable for a key too small to hold a SHA-1 DigestInfo (< 368 bits),
            // which from_pem's key validation and any real key rule out. An empty
            // signature means "unsigned", which readers then refuse: safe, not silent
            // corruption.
            Err(e) => {
                tracing::error!("cannot sign entry: {e}");
                String::new()
            }
        }
    }

    pub fn public_key(&self) -> rsa::RsaPublicKey {
        rsa::RsaPublicKey::from(&self.key)
    }

    /// Refuses a key whose public half is in none of the trusted certificates, as the
    /// reference client does: entries it signs could never be downloaded.
    pub fn check_trusted(&self, verifier: &Verifier, label: &str) -> Result<(), SignatureError> {
        if verifier.trusts(&self.public_key()) {
            Ok(())
        } else {
            Err(SignatureError::NoMatchingCertificate(label.to_string()))
        }
    }
}

/// A new RSA key (PKCS#8 PEM) and a self-signed certificate (PEM) for `common_name`,
/// valid 100 years.
pub fn generate(bits: usize, common_name: &str) -> Result<(String, String), SignatureError> {
    cert::generate(bits, common_name)
}

#[cfg(test)]
mod memo_tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/signature")
            .join(name)
    }

    #[test]
    fn each_entry_is_verified_once_and_a_changed_signature_again() {
        let pem = std::fs::read_to_string(fixture("signer-a.crt")).unwrap();
        let (v, warnings) = Verifier::from_pems(&[pem]);
        assert!(warnings.is_empty(), "{warnings:?}");
        let a = Signer::load(&fixture("signer-a.pkcs8.key")).unwrap();
        let b = Signer::load(&fixture("signer-b.key")).unwrap();
        let inners = ["{\"file\": \"x\"}", "{\"file\": \"y\"}"];
        let sigs: Vec<String> = inners.iter().map(|i| a.sign(i)).collect();
        let clone = v.clone();
        for _ in 0..3 {
            for (i, s) in inners.iter().zip(&sigs) {
                assert!(v.verify(i, s).is_some());
                assert!(clone.verify(i, s).is_some(), "a clone shares the verdicts");
            }
        }
        assert_eq!(v.verifications(), 2, "each entry verified once");
        // Same inner string, another signature (by an untrusted key): verified again,
        // and refused.
        let forged = b.sign(inners[0]);
        assert!(v.verify(inners[0], &forged).is_none());
        assert!(v.verify(inners[0], &forged).is_none());
        assert_eq!(v.verifications(), 3);
        // The inner string changed under the same signature: verified again, refused.
        assert!(v.verify("{\"file\": \"z\"}", &sigs[0]).is_none());
        assert_eq!(v.verifications(), 4);
        // The good one still verifies.
        assert!(v.verify(inners[0], &sigs[0]).is_some());
        assert_eq!(v.verifications(), 4);
    }
}
