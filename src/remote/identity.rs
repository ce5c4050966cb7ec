//! The client's own TLS identity (`shacache-cert-file`/`-key-file`, the `shadir-` pair),
//! presented as configured: our side never judges it stricter than the server that
//! receives it.
//!
//! - The certificate chain is sent as it is. It is parsed (with `x509-cert`, which reads
//!   X.509 v1 as well as v3) only to check that the key is the certificate's key; no WebPKI
//!   validation of our own chain (rustls' `with_client_auth_cert` does one, and refuses
//!   v1 certificates).
//! - The key: what ring signs with (ECDSA, Ed25519, RSA of 2048 to 8192 bits) is ring's;
//!   an RSA key ring refuses (under 2048 bits, as many SlapOS upload keys are) signs
//!   through the `rsa` crate, PSS or PKCS#1 v1.5 (SHA-256/384/512, SHA-1 last), blinded.
//! - Server certificates are not this module's business: they are verified strictly
//!   (`tls.rs`).

use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
use rsa::traits::PublicKeyParts;
use rsa::{Pkcs1v15Sign, Pss, RsaPrivateKey};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, SubjectPublicKeyInfoDer};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};
use sha2::Digest;
use std::sync::Arc;

/// What the configured certificate and key are, for messages ("X.509 v1, RSA-1024").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Described {
    /// 1, 2 or 3; `None` when the certificate could not be parsed (it is sent anyway).
    pub version: Option<u8>,
    pub subject: Option<String>,
    /// "RSA-1024", "ECDSA", "Ed25519".
    pub key: String,
}

impl std::fmt::Display for Described {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.version {
            Some(v) => write!(f, "X.509 v{v}")?,
            None => write!(f, "X.509 (unparsed)")?,
        }
        write!(f, ", {} key", self.key)?;
        if let Some(s) = &self.subject {
            write!(f, ", subject {s}")?;
        }
        Ok(())
    }
}

/// The chain and key as rustls uses them, checked to belong together. The error is a
/// message to prefix with the service and file names.
pub(crate) fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, Described), String> {
    let signing_key = load_signing_key(key, provider)?;
    let first = chain.first().ok_or("no certificate")?;
    let mut described = Described {
        version: None,
        subject: None,
        key: describe_key(signing_key.as_ref()),
    };
    match parse_cert(first) {
        Ok(cert) => {
            let tbs = &cert.tbs_certificate;
            described.version = Some(match tbs.version {
                x509_cert::Version::V1 => 1,
                x509_cert::Version::V2 => 2,
                x509_cert::Version::V3 => 3,
            });
            described.subject = Some(tbs.subject.to_string());
            if let Some(key_spki) = signing_key.public_key() {
                if !same_public_key(&tbs.subject_public_key_info, key_spki.as_ref()) {
                    return Err("the key does not match the certificate's public key".into());
                }
            }
        }
        // Not ours to refuse: the server decides what it can read.
        Err(e) => tracing::debug!(error = %e, "client certificate not parsed; sent as is"),
    }
    Ok((CertifiedKey::new(chain, signing_key), described))
}

fn parse_cert(der: &CertificateDer<'_>) -> Result<x509_cert::Certificate, der::Error> {
    use der::Decode;
    x509_cert::Certificate::from_der(der.as_ref())
}

/// The same algorithm and key bits (parameters are not compared: an RSA key's NULL may be
/// written or omitted).
fn same_public_key(cert_spki: &spki::SubjectPublicKeyInfoOwned, key_spki: &[u8]) -> bool {
    use der::Decode;
    match spki::SubjectPublicKeyInfoOwned::from_der(key_spki) {
        Ok(k) => {
            k.algorithm.oid == cert_spki.algorithm.oid
                && k.subject_public_key.raw_bytes() == cert_spki.subject_public_key.raw_bytes()
        }
        // Cannot tell: let the server judge.
        Err(_) => true,
    }
}

fn describe_key(key: &dyn SigningKey) -> String {
    match key.algorithm() {
        SignatureAlgorithm::RSA => {
            let bits = key
                .public_key()
                .and_then(|spki| {
                    use rsa::pkcs8::DecodePublicKey;
                    rsa::RsaPublicKey::from_public_key_der(spki.as_ref()).ok()
                })
                .map(|k| k.n().bits());
            match bits {
                Some(b) => format!("RSA-{b}"),
                None => "RSA".into(),
            }
        }
        SignatureAlgorithm::ECDSA => "ECDSA".into(),
        SignatureAlgorithm::ED25519 => "Ed25519".into(),
        other => format!("{other:?}"),
    }
}

/// ring's signing key when ring takes the key, else an RSA key ring refuses (too small)
/// signed with the `rsa` crate.
pub(crate) fn load_signing_key(
    key: PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> Result<Arc<dyn SigningKey>, String> {
    let ring_error = match provider.key_provider.load_private_key(key.clone_key()) {
        Ok(k) => return Ok(k),
        Err(e) => e,
    };
    let rsa_key = match &key {
        PrivateKeyDer::Pkcs1(k) => RsaPrivateKey::from_pkcs1_der(k.secret_pkcs1_der())
            .map_err(|e| format!("RSA key (PKCS#1): {e}"))?,
        // A PKCS#8 key that is not RSA keeps ring's error.
        PrivateKeyDer::Pkcs8(k) => RsaPrivateKey::from_pkcs8_der(k.secret_pkcs8_der())
            .map_err(|_| ring_error.to_string())?,
        _ => return Err(ring_error.to_string()),
    };
    let key = RsaKey::new(rsa_key)?;
    tracing::debug!(bits = key.bits, "client key: RSA signed by the rsa crate");
    Ok(Arc::new(key))
}

/// An RSA key of any size the `rsa` crate reads.
pub(crate) struct RsaKey {
    key: Arc<RsaPrivateKey>,
    spki: Vec<u8>,
    bits: usize,
}

impl std::fmt::Debug for RsaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        f.debug_struct("RsaKey").field("bits", &self.bits).finish()
    }
}

/// Preference order (ring's): PSS before PKCS#1 v1.5, longer hashes first; SHA-1 only
/// when a TLS 1.2 server offers nothing else.
const RSA_SCHEMES: [SignatureScheme; 7] = [
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PKCS1_SHA512,
    SignatureScheme::RSA_PKCS1_SHA384,
    SignatureScheme::RSA_PKCS1_SHA256,
    SignatureScheme::RSA_PKCS1_SHA1,
];

impl RsaKey {
    pub(crate) fn new(key: RsaPrivateKey) -> Result<RsaKey, String> {
        let spki = rsa::RsaPublicKey::from(&key)
            .to_public_key_der()
            .map_err(|e| format!("RSA public key: {e}"))?
            .into_vec();
        let bits = key.n().bits();
        Ok(RsaKey {
            key: Arc::new(key),
            spki,
            bits,
        })
    }

    /// Whether a signature of this scheme fits in the modulus: PSS (salt as long as the
    /// hash) needs `2·hLen + 2` bytes of encoded message; PKCS#1 v1.5 needs the DigestInfo
    /// (19 bytes of prefix + hash; 15 for SHA-1) + 11. A 1024-bit key cannot make
    /// PSS/SHA-512 (130 > 128 bytes).
    fn fits(&self, scheme: SignatureScheme) -> bool {
        let em_len = (self.bits - 1).div_ceil(8);
        let k = self.bits.div_ceil(8);
        match scheme_hash_len(scheme) {
            Some((true, h)) => em_len >= 2 * h + 2,
            Some((false, h)) => k >= h + if h == 20 { 15 } else { 19 } + 11,
            None => false,
        }
    }
}

/// (is PSS, hash length) of the RSA schemes this key signs with.
fn scheme_hash_len(scheme: SignatureScheme) -> Option<(bool, usize)> {
    Some(match scheme {
        SignatureScheme::RSA_PSS_SHA512 => (true, 64),
        SignatureScheme::RSA_PSS_SHA384 => (true, 48),
        SignatureScheme::RSA_PSS_SHA256 => (true, 32),
        SignatureScheme::RSA_PKCS1_SHA512 => (false, 64),
        SignatureScheme::RSA_PKCS1_SHA384 => (false, 48),
        SignatureScheme::RSA_PKCS1_SHA256 => (false, 32),
        SignatureScheme::RSA_PKCS1_SHA1 => (false, 20),
        _ => return None,
    })
}

impl SigningKey for RsaKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = RSA_SCHEMES
            .into_iter()
            .find(|s| offered.contains(s) && self.fits(*s))?;
        Some(Box::new(RsaSigner {
            key: self.key.clone(),
            scheme,
        }))
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::RSA
    }
}

struct RsaSigner {
    key: Arc<RsaPrivateKey>,
    scheme: SignatureScheme,
}

impl std::fmt::Debug for RsaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RsaSigner")
            .field("scheme", &self.scheme)
            .finish()
    }
}

fn hashed<D: Digest>(message: &[u8]) -> Vec<u8> {
    D::digest(message).to_vec()
}

impl Signer for RsaSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        use sha2::{Sha256, Sha384, Sha512};
        // The random source blinds the private-key operation (and makes the PSS salt);
        // `Pss::new_blinded` is standard RSASSA-PSS with that blinding turned on.
        let mut rng = rand::rngs::OsRng;
        let key = &self.key;
        let signed = match self.scheme {
            SignatureScheme::RSA_PSS_SHA512 => key.sign_with_rng(
                &mut rng,
                Pss::new_blinded::<Sha512>(),
                &hashed::<Sha512>(message),
            ),
            SignatureScheme::RSA_PSS_SHA384 => key.sign_with_rng(
                &mut rng,
                Pss::new_blinded::<Sha384>(),
                &hashed::<Sha384>(message),
            ),
            SignatureScheme::RSA_PSS_SHA256 => key.sign_with_rng(
                &mut rng,
                Pss::new_blinded::<Sha256>(),
                &hashed::<Sha256>(message),
            ),
            SignatureScheme::RSA_PKCS1_SHA512 => key.sign_with_rng(
                &mut rng,
                Pkcs1v15Sign::new::<Sha512>(),
                &hashed::<Sha512>(message),
            ),
            SignatureScheme::RSA_PKCS1_SHA384 => key.sign_with_rng(
                &mut rng,
                Pkcs1v15Sign::new::<Sha384>(),
                &hashed::<Sha384>(message),
            ),
            SignatureScheme::RSA_PKCS1_SHA256 => key.sign_with_rng(
                &mut rng,
                Pkcs1v15Sign::new::<Sha256>(),
                &hashed::<Sha256>(message),
            ),
            SignatureScheme::RSA_PKCS1_SHA1 => key.sign_with_rng(
                &mut rng,
                Pkcs1v15Sign::new::<sha1::Sha1>(),
                &hashed::<sha1::Sha1>(message),
            ),
            other => {
                return Err(rustls::Error::General(format!(
                    "RSA client key: scheme {other:?} not supported"
                )))
            }
        };
        signed.map_err(|e| rustls::Error::General(format!("RSA client key: signing: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// Presents the configured certificate whenever a server asks for one. When the key can
/// make none of the signatures the server accepts, rustls sends no certificate: that is
/// logged, so the server's refusal that follows can be understood.
#[derive(Debug)]
pub(crate) struct ConfiguredCert {
    service: String,
    key: Arc<CertifiedKey>,
    described: Described,
}

impl ConfiguredCert {
    pub(crate) fn new(service: &str, key: CertifiedKey, described: Described) -> ConfiguredCert {
        ConfiguredCert {
            service: service.to_string(),
            key: Arc::new(key),
            described,
        }
    }
}

impl ResolvesClientCert for ConfiguredCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        if self.key.key.choose_scheme(sigschemes).is_none() {
            tracing::warn!(
                service = %self.service,
                certificate = %self.described,
                offered = ?sigschemes,
                "the server asks for a client certificate, but accepts no signature this \
                 key can make: none is sent"
            );
        } else {
            tracing::debug!(service = %self.service, certificate = %self.described,
                "presenting the client certificate");
        }
        Some(self.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::pkcs8::DecodePublicKey;

    fn rsa_key(bits: usize) -> RsaKey {
        RsaKey::new(RsaPrivateKey::new(&mut rand::rngs::OsRng, bits).unwrap()).unwrap()
    }

    fn verify(key: &RsaKey, scheme: SignatureScheme, msg: &[u8], sig: &[u8]) {
        use sha2::{Sha256, Sha384, Sha512};
        let public = rsa::RsaPublicKey::from_public_key_der(&key.spki).unwrap();
        let r = match scheme {
            SignatureScheme::RSA_PSS_SHA512 => {
                public.verify(Pss::new::<Sha512>(), &hashed::<Sha512>(msg), sig)
            }
            SignatureScheme::RSA_PSS_SHA384 => {
                public.verify(Pss::new::<Sha384>(), &hashed::<Sha384>(msg), sig)
            }
            SignatureScheme::RSA_PSS_SHA256 => {
                public.verify(Pss::new::<Sha256>(), &hashed::<Sha256>(msg), sig)
            }
            SignatureScheme::RSA_PKCS1_SHA512 => {
                public.verify(Pkcs1v15Sign::new::<Sha512>(), &hashed::<Sha512>(msg), sig)
            }
            SignatureScheme::RSA_PKCS1_SHA384 => {
                public.verify(Pkcs1v15Sign::new::<Sha384>(), &hashed::<Sha384>(msg), sig)
            }
            SignatureScheme::RSA_PKCS1_SHA256 => {
                public.verify(Pkcs1v15Sign::new::<Sha256>(), &hashed::<Sha256>(msg), sig)
            }
            SignatureScheme::RSA_PKCS1_SHA1 => public.verify(
                Pkcs1v15Sign::new::<sha1::Sha1>(),
                &hashed::<sha1::Sha1>(msg),
                sig,
            ),
            other => panic!("unexpected {other:?}"),
        };
        r.unwrap_or_else(|e| panic!("{scheme:?} with {} bits: {e}", key.bits));
    }

    /// Every scheme a key fits signs verifiably; a 1024-bit key cannot make PSS/SHA-512
    /// and is never asked to.
    #[test]
    fn rsa_1024_and_2048_sign_every_scheme_that_fits() {
        let msg = b"TLS CertificateVerify content";
        for bits in [1024, 2048] {
            let key = rsa_key(bits);
            for scheme in RSA_SCHEMES {
                let fits = key.fits(scheme);
                assert_eq!(
                    fits,
                    !(bits == 1024 && scheme == SignatureScheme::RSA_PSS_SHA512),
                    "{scheme:?} {bits}"
                );
                let signer = key.choose_scheme(&[scheme]);
                if !fits {
                    assert!(signer.is_none());
                    continue;
                }
                let signer = signer.unwrap();
                assert_eq!(signer.scheme(), scheme);
                assert_eq!(signer.sign(msg).unwrap().len(), bits / 8);
                verify(&key, scheme, msg, &signer.sign(msg).unwrap());
            }
        }
    }

    #[test]
    fn scheme_preference_pss_first_and_within_the_offer() {
        let key = rsa_key(1024);
        let all = RSA_SCHEMES.to_vec();
        // PSS/SHA-512 does not fit 1024 bits: the next best.
        assert_eq!(
            key.choose_scheme(&all).unwrap().scheme(),
            SignatureScheme::RSA_PSS_SHA384
        );
        let tls12_old = [
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::RSA_PKCS1_SHA1,
            SignatureScheme::RSA_PKCS1_SHA256,
        ];
        assert_eq!(
            key.choose_scheme(&tls12_old).unwrap().scheme(),
            SignatureScheme::RSA_PKCS1_SHA256
        );
        assert!(key
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
            .is_none());
        assert_eq!(key.algorithm(), SignatureAlgorithm::RSA);
        assert!(!format!("{key:?}").contains("key:"), "{key:?}");
    }

    #[test]
    fn ring_keeps_the_keys_it_takes() {
        let provider = rustls::crypto::ring::default_provider();
        let pem = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/signature/signer-b.key"),
        )
        .unwrap();
        let der = rustls_pemfile::private_key(&mut pem.as_slice())
            .unwrap()
            .unwrap();
        let k = load_signing_key(der, &provider).unwrap();
        // ring's own key type, not ours.
        assert!(!format!("{k:?}").starts_with("RsaKey"), "{k:?}");
        let pem = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/tls/legacy-rsa1024.key"),
        )
        .unwrap();
        let der = rustls_pemfile::private_key(&mut pem.as_slice())
            .unwrap()
            .unwrap();
        let k = load_signing_key(der, &provider).unwrap();
        assert!(format!("{k:?}").starts_with("RsaKey"), "{k:?}");
    }
}
