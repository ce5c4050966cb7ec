//! X.509 handling for signatures: reduce a PEM certificate to its subject name and RSA
//! public key (nothing else in a certificate is trusted or checked), and build the
//! self-signed certificate of a new signing key.

use super::{SignatureError, TrustedCert};
use der::asn1::{AnyRef, Ia5StringRef, PrintableStringRef, SetOfVec, TeletexStringRef};
use der::{Decode, Encode, EncodePem, Reader, SliceReader, Tag, Tagged};
use rand::RngCore;
use rsa::pkcs8::{DecodePublicKey, EncodePrivateKey, LineEnding};
use spki::SubjectPublicKeyInfoOwned;
use std::time::Duration;
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::Validity;
use x509_cert::Certificate;

/// id-at-commonName.
const COMMON_NAME: der::oid::ObjectIdentifier = der::oid::ObjectIdentifier::new_unwrap("2.5.4.3");

/// The SlapOS tooling's validity (`openssl req -days 36500`).
const VALIDITY_DAYS: u64 = 36500;

/// The smallest key `generate` accepts (production keys are 1024; new ones should be more).
const MIN_BITS: usize = 1024;

/// Parses the certificates of one PEM text. Notes describe certificates accepted only by
/// the lenient path.
pub(super) fn parse_pem(pem: &str) -> Result<(Vec<TrustedCert>, Vec<String>), String> {
    let mut rest = pem.as_bytes();
    let mut certs = Vec::new();
    let mut notes = Vec::new();
    let mut errors = Vec::new();
    // Bounded: every iteration consumes one PEM section of `rest`.
    loop {
        let (item, remainder) = match rustls_pemfile::read_one_from_slice(rest) {
            Ok(Some(found)) => found,
            Ok(None) => break,
            Err(e) => {
                errors.push(format!("bad PEM: {e:?}"));
                break;
            }
        };
        rest = remainder;
        if let rustls_pemfile::Item::X509Certificate(der) = item {
            match parse_der(der.as_ref()) {
                Ok((cert, note)) => {
                    notes.extend(note);
                    certs.push(cert);
                }
                Err(e) => errors.push(e),
            }
        }
    }
    if certs.is_empty() {
        if errors.is_empty() {
            errors.push("no PEM \"BEGIN CERTIFICATE\" block".to_string());
        }
        return Err(errors.join("; "));
    }
    // Some certificates of this text parsed: keep them, report the others.
    notes.extend(
        errors
            .into_iter()
            .map(|e| format!("one certificate skipped: {e}")),
    );
    Ok((certs, notes))
}

/// One DER certificate. The strict X.509 decoder comes first; when it refuses (old
/// tooling wrote some non-canonical fields that do not matter here), a lenient walk takes
/// just the subject and the SubjectPublicKeyInfo, which are all that counts.
fn parse_der(der: &[u8]) -> Result<(TrustedCert, Option<String>), String> {
    match Certificate::from_der(der) {
        Ok(cert) => {
            let tbs = &cert.tbs_certificate;
            let spki = tbs
                .subject_public_key_info
                .to_der()
                .map_err(|e| format!("cannot re-encode its public key: {e}"))?;
            let subject = subject_string(&tbs.subject);
            let public_key = rsa_key(&spki, &subject)?;
            Ok((
                TrustedCert {
                    subject: subject.into(),
                    public_key,
                },
                None,
            ))
        }
        Err(strict) => {
            let (subject, spki) =
                lenient_fields(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
            let subject = Name::from_der(subject)
                .map(|n| subject_string(&n))
                .unwrap_or_else(|_| "(unreadable subject)".to_string());
            let public_key = rsa_key(spki, &subject)?;
            let note = format!(
                "{subject}: not a strictly valid certificate ({strict}); its public key is used anyway"
            );
            Ok((
                TrustedCert {
                    subject: subject.into(),
                    public_key,
                },
                Some(note),
            ))
        }
    }
}

fn rsa_key(spki_der: &[u8], subject: &str) -> Result<rsa::RsaPublicKey, String> {
    rsa::RsaPublicKey::from_public_key_der(spki_der)
        .map_err(|e| format!("{subject}: no usable RSA public key ({e})"))
}

/// The DER of the subject and of the SubjectPublicKeyInfo, found by position only:
/// Certificate ::= SEQUENCE { tbs SEQUENCE { [0] version OPTIONAL, serial, signature,
/// issuer, validity, subject, subjectPublicKeyInfo, ... }, ... }.
fn lenient_fields(der: &[u8]) -> der::Result<(&[u8], &[u8])> {
    let cert = AnyRef::from_der(der)?;
    cert.tag().assert_eq(Tag::Sequence)?;
    let mut reader = SliceReader::new(cert.value())?;
    let tbs: AnyRef<'_> = reader.decode()?;
    tbs.tag().assert_eq(Tag::Sequence)?;
    let tbs_value = tbs.value();
    let mut reader = SliceReader::new(tbs_value)?;
    let first: AnyRef<'_> = reader.decode()?;
    if first.tag().is_context_specific() {
        let _serial: AnyRef<'_> = reader.decode()?;
    }
    // signature algorithm, issuer, validity
    for _ in 0..3 {
        let _: AnyRef<'_> = reader.decode()?;
    }
    let subject = next_raw(&mut reader, tbs_value)?;
    let spki = next_raw(&mut reader, tbs_value)?;
    Ok((subject, spki))
}

/// The raw bytes (header included) of the next element of `reader`, which reads `whole`.
fn next_raw<'a>(reader: &mut SliceReader<'a>, whole: &'a [u8]) -> der::Result<&'a [u8]> {
    let start = usize::try_from(reader.position())?;
    let _: AnyRef<'a> = reader.decode()?;
    let end = usize::try_from(reader.position())?;
    whole
        .get(start..end)
        .ok_or_else(|| der::ErrorKind::Failed.into())
}

/// The CN when there is one, else the whole subject (RFC 4514 form).
fn subject_string(name: &Name) -> String {
    name.0
        .iter()
        .rev()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == COMMON_NAME)
        .and_then(|atv| attribute_text(atv.value.tag(), atv.value.value()))
        .unwrap_or_else(|| name.to_string())
}

/// The text of a directory string of the kinds certificates actually use.
fn attribute_text(tag: Tag, bytes: &[u8]) -> Option<String> {
    let any = AnyRef::new(tag, bytes).ok()?;
    let text = match tag {
        Tag::Utf8String => std::str::from_utf8(bytes).ok()?.to_string(),
        Tag::PrintableString => PrintableStringRef::try_from(any).ok()?.to_string(),
        Tag::Ia5String => Ia5StringRef::try_from(any).ok()?.to_string(),
        Tag::TeletexString => TeletexStringRef::try_from(any).ok()?.to_string(),
        Tag::BmpString => {
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()?
        }
        _ => return None,
    };
    Some(text)
}

/// See `super::generate`.
pub(super) fn generate(bits: usize, common_name: &str) -> Result<(String, String), SignatureError> {
    let err =
        |what: &str, e: &dyn std::fmt::Display| SignatureError::Keygen(format!("{what}: {e}"));
    if bits < MIN_BITS {
        return Err(SignatureError::Keygen(format!(
            "{bits}-bit keys are too small (at least {MIN_BITS})"
        )));
    }
    if common_name.is_empty() {
        return Err(SignatureError::Keygen("empty common name".to_string()));
    }
    let mut rng = rand::rngs::OsRng;
    let key = rsa::RsaPrivateKey::new(&mut rng, bits).map_err(|e| err("RSA key", &e))?;
    let key_pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| err("key encoding", &e))?
        .to_string();

    let spki = SubjectPublicKeyInfoOwned::from_key(rsa::RsaPublicKey::from(&key))
        .map_err(|e| err("public key encoding", &e))?;
    let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(key);
    let validity = Validity::from_now(Duration::from_secs(VALIDITY_DAYS * 86_400))
        .map_err(|e| err("validity", &e))?;
    let subject = common_name_only(common_name).map_err(|e| err("subject", &e))?;
    let builder = CertificateBuilder::new(
        Profile::Root,
        random_serial(&mut rng).map_err(|e| err("serial", &e))?,
        validity,
        subject,
        spki,
        &signer,
    )
    .map_err(|e| err("certificate", &e))?;
    let cert = builder
        .build::<rsa::pkcs1v15::Signature>()
        .map_err(|e| err("certificate signature", &e))?;
    let cert_pem = cert
        .to_pem(LineEnding::LF)
        .map_err(|e| err("certificate encoding", &e))?;
    Ok((key_pem, cert_pem))
}

/// `/CN=<cn>` as a UTF8String, built directly so that no character of `cn` needs
/// RFC 4514 escaping.
fn common_name_only(cn: &str) -> der::Result<Name> {
    let value = der::asn1::Any::new(Tag::Utf8String, cn.as_bytes())?;
    let atv = AttributeTypeAndValue {
        oid: COMMON_NAME,
        value,
    };
    let rdn = RelativeDistinguishedName(SetOfVec::try_from(vec![atv])?);
    Ok(RdnSequence(vec![rdn]))
}

/// A random positive 16-byte serial (the top bit cleared keeps it positive, the next one
/// set keeps its length fixed).
fn random_serial(rng: &mut impl RngCore) -> der::Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    rng.fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::new(&bytes)
}
