//! Unit tests of signatures against the openssl-made fixtures and the openssl CLI.

use super::*;
use base64::Engine as _;
use der::asn1::AnyRef;
use der::{Decode, Encode, Reader as _, Tag};
use std::process::Command;
use std::sync::OnceLock;

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/signature/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn fixture_path(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/signature")
        .join(name)
}

fn verifier(names: &[&str]) -> Verifier {
    let pems: Vec<String> = names.iter().map(|n| fixture(n)).collect();
    let (v, warnings) = Verifier::from_pems(&pems);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(v.certs.len(), names.len());
    v
}

fn signer_a() -> Signer {
    Signer::load(&fixture_path("signer-a.pkcs8.key")).unwrap()
}

fn signer_b() -> Signer {
    Signer::load(&fixture_path("signer-b.key")).unwrap()
}

fn verdicts(v: &Verifier) -> Vec<bool> {
    let body = fixture("shadir-response.json");
    let listing = crate::wire::parse_listing(body.as_bytes()).unwrap();
    assert!(listing.rejected.is_empty());
    listing
        .entries
        .iter()
        .map(|e| v.verify(&e.inner, &e.signature).is_some())
        .collect()
}

/// One 1024-bit generated key and certificate for the whole test run (slow in debug).
fn generated() -> &'static (String, String) {
    static GENERATED: OnceLock<(String, String)> = OnceLock::new();
    GENERATED.get_or_init(|| generate(1024, "shacachefs test, \"quoted\"").unwrap())
}

fn openssl(args: &[&str]) -> std::process::Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("the openssl command line is needed by this test")
}

#[test]
fn verdicts_trusting_a_and_b() {
    let v = verifier(&["signer-a.crt", "signer-b.crt"]);
    assert_eq!(verdicts(&v), [true, true, false, false]);
}

#[test]
fn verdicts_trusting_a_only() {
    let v = verifier(&["signer-a.crt"]);
    assert_eq!(verdicts(&v), [true, false, false, false]);
}

#[test]
fn verdicts_trusting_nothing_verify_nothing() {
    let v = Verifier::default();
    assert!(v.is_empty());
    assert_eq!(verdicts(&v), [false, false, false, false]);
}

#[test]
fn verify_names_the_matching_certificate() {
    let v = verifier(&["signer-a.crt", "signer-b.crt"]);
    let a = v.verify(&fixture("entry-a.json"), fixture("entry-a.sig").trim());
    assert_eq!(&*a.unwrap().subject, "shacachefs-fixture-a");
    let b = v.verify(&fixture("entry-b.json"), fixture("entry-b.sig").trim());
    assert_eq!(&*b.unwrap().subject, "shacachefs-fixture-b");
}

#[test]
fn signing_reproduces_the_fixture_with_both_key_formats() {
    let inner = fixture("entry-a.json");
    let expected = fixture("entry-a.sig");
    for name in ["signer-a.pkcs1.key", "signer-a.pkcs8.key"] {
        let signer = Signer::load(&fixture_path(name)).unwrap();
        assert_eq!(signer.sign(&inner), expected.trim(), "{name}");
    }
    let b = signer_b().sign(&fixture("entry-b.json"));
    assert_eq!(b, fixture("entry-b.sig").trim());
}

#[test]
fn a_signature_by_b_verifies_against_b_not_a() {
    let inner = "{\"sha512\": \"00\", \"file\": \"x\"}";
    let sig = signer_b().sign(inner);
    assert!(verifier(&["signer-b.crt"]).verify(inner, &sig).is_some());
    assert!(verifier(&["signer-a.crt"]).verify(inner, &sig).is_none());
}

#[test]
fn tampered_inner_fails() {
    let v = verifier(&["signer-a.crt", "signer-b.crt"]);
    let inner = fixture("entry-a.json");
    let sig = fixture("entry-a.sig");
    assert!(v.verify(&inner, sig.trim()).is_some());
    let tampered = inner.replace("hello.txt", "hellO.txt");
    assert_ne!(tampered, inner);
    assert!(v.verify(&tampered, sig.trim()).is_none());
    // One byte more (a re-serialisation with a trailing newline) is another message.
    assert!(v.verify(&format!("{inner}\n"), sig.trim()).is_none());
}

#[test]
fn malformed_signatures_fail_without_panic() {
    let v = verifier(&["signer-a.crt", "signer-b.crt"]);
    let inner = fixture("entry-a.json");
    let sig = fixture("entry-a.sig").trim().to_string();
    let flipped = {
        let mut bytes = base64::engine::general_purpose::STANDARD
            .decode(&sig)
            .unwrap();
        bytes[10] ^= 1;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    let oversized = base64::engine::general_purpose::STANDARD.encode([0xffu8; 512]);
    let cases = [
        String::new(),
        "   ".to_string(),
        "not base64 at all!".to_string(),
        "====".to_string(),
        "QQ".to_string(),
        sig[..sig.len() - 4].to_string(),
        sig[..40].to_string(),
        sig.replace('=', ""),
        format!("{sig}AAAA"),
        flipped,
        oversized,
        "AA==".to_string(),
        "\u{e9}\u{e9}\u{e9}\u{e9}".to_string(),
    ];
    for case in &cases {
        assert!(v.verify(&inner, case).is_none(), "accepted {case:?}");
    }
}

#[test]
fn line_wrapped_signature_is_accepted() {
    // Old tooling wrapped base64 at 76 columns; Python's decoder ignores the breaks.
    let v = verifier(&["signer-a.crt"]);
    let sig = fixture("entry-a.sig").trim().to_string();
    let wrapped = format!("{}\n{}\n", &sig[..76], &sig[76..]);
    assert!(v.verify(&fixture("entry-a.json"), &wrapped).is_some());
}

#[test]
fn garbage_certificate_is_skipped_with_a_warning() {
    let pems = vec![
        fixture("signer-a.crt"),
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
            .to_string(),
        "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n".to_string(),
        "no PEM here".to_string(),
        String::new(),
        fixture("signer-b.crt"),
    ];
    let (v, warnings) = Verifier::from_pems(&pems);
    assert_eq!(v.certs.len(), 2);
    assert_eq!(warnings.len(), 4, "{warnings:?}");
    assert!(warnings[0].contains("#2"), "{warnings:?}");
    assert_eq!(verdicts(&v), [true, true, false, false]);
}

#[test]
fn non_rsa_certificate_is_skipped_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let crt = dir.path().join("ec.crt");
    let key = dir.path().join("ec.key");
    let out = openssl(&[
        "req",
        "-x509",
        "-nodes",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-subj",
        "/CN=ec-signer",
        "-days",
        "1",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        crt.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let pems = vec![
        std::fs::read_to_string(&crt).unwrap(),
        fixture("signer-a.crt"),
    ];
    let (v, warnings) = Verifier::from_pems(&pems);
    assert_eq!(v.certs.len(), 1);
    assert_eq!(&*v.certs[0].subject, "shacachefs-fixture-a");
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("ec-signer"), "{warnings:?}");
    // And an EC private key is no signing key.
    let err = Signer::load(&key).unwrap_err();
    assert!(matches!(err, SignatureError::BadKey(_)), "{err}");
}

#[test]
fn subject_without_cn_is_the_whole_subject() {
    let dir = tempfile::tempdir().unwrap();
    let crt = dir.path().join("o.crt");
    let key = dir.path().join("o.key");
    let out = openssl(&[
        "req",
        "-x509",
        "-nodes",
        "-newkey",
        "rsa:1024",
        "-subj",
        "/O=Example Org/OU=Cache",
        "-days",
        "1",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        crt.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let (v, warnings) = Verifier::from_pems(&[std::fs::read_to_string(&crt).unwrap()]);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(&*v.certs[0].subject, "OU=Cache,O=Example Org");
}

#[test]
fn production_certificate_parses() {
    let cfg = std::fs::read_to_string(format!(
        "{}/tests/fixtures/config/slapcache.cfg",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let start = cfg.find("-----BEGIN CERTIFICATE-----").unwrap();
    let end = cfg.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
    let pem: String = cfg[start..end]
        .lines()
        .map(|l| format!("{}\n", l.trim()))
        .collect();
    let (v, warnings) = Verifier::from_pems(&[pem]);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(v.certs.len(), 1);
    assert_eq!(&*v.certs[0].subject, "COMP-");
    assert_eq!(
        rsa::traits::PublicKeyParts::size(&v.certs[0].public_key),
        128
    );
    // Not our key: entries by fixture A are not trusted by it.
    assert!(v
        .verify(&fixture("entry-a.json"), fixture("entry-a.sig").trim())
        .is_none());
}

/// One DER element: `tag` around `content`.
fn tlv(tag: Tag, content: &[u8]) -> Vec<u8> {
    AnyRef::new(tag, content).unwrap().to_der().unwrap()
}

#[test]
fn non_strict_certificate_still_gives_its_key() {
    // Fixture A with a 30-byte serial: x509-cert refuses it (RFC 5280 allows 20), the
    // lenient walk still finds subject and key. The certificate's own signature is now
    // wrong, which does not matter: only its public key is trusted.
    let pem = fixture("signer-a.crt");
    let der = match rustls_pemfile::read_one_from_slice(pem.as_bytes()) {
        Ok(Some((rustls_pemfile::Item::X509Certificate(d), _))) => d.as_ref().to_vec(),
        other => panic!("not a certificate: {other:?}"),
    };
    let cert = AnyRef::from_der(&der).unwrap();
    let mut outer = der::SliceReader::new(cert.value()).unwrap();
    let tbs: AnyRef<'_> = outer.decode().unwrap();
    let sig_alg: AnyRef<'_> = outer.decode().unwrap();
    let sig: AnyRef<'_> = outer.decode().unwrap();
    let mut inner = der::SliceReader::new(tbs.value()).unwrap();
    let mut fields: Vec<Vec<u8>> = Vec::new();
    while !inner.is_finished() {
        let f: AnyRef<'_> = inner.decode().unwrap();
        fields.push(f.to_der().unwrap());
    }
    let mut serial = vec![0x11u8; 30];
    serial[0] = 0x22;
    fields[1] = tlv(Tag::Integer, &serial);
    let tbs2 = tlv(Tag::Sequence, &fields.concat());
    let cert2 = tlv(
        Tag::Sequence,
        &[tbs2, sig_alg.to_der().unwrap(), sig.to_der().unwrap()].concat(),
    );
    assert!(x509_cert::Certificate::from_der(&cert2).is_err());
    let pem2 = der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, &cert2).unwrap();

    let (v, warnings) = Verifier::from_pems(&[pem2]);
    assert_eq!(v.certs.len(), 1);
    assert_eq!(&*v.certs[0].subject, "shacachefs-fixture-a");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("used anyway"), "{warnings:?}");
    assert_eq!(verdicts(&v), [true, false, false, false]);
}

#[test]
fn check_trusted_compares_public_keys() {
    let a = signer_a();
    assert!(a
        .check_trusted(&verifier(&["signer-a.crt", "signer-b.crt"]), "a.key")
        .is_ok());
    let err = a
        .check_trusted(&verifier(&["signer-b.crt"]), "a.key")
        .unwrap_err();
    assert!(matches!(&err, SignatureError::NoMatchingCertificate(l) if l == "a.key"));
    assert!(err.to_string().contains("a.key"));
    assert!(a.check_trusted(&Verifier::default(), "a.key").is_err());
    let pkcs1 = Signer::load(&fixture_path("signer-a.pkcs1.key")).unwrap();
    assert_eq!(pkcs1.public_key(), a.public_key());
}

#[test]
fn bad_keys_are_refused() {
    assert!(matches!(
        Signer::from_pem("", "empty"),
        Err(SignatureError::BadKey(l)) if l == "empty"
    ));
    assert!(matches!(
        Signer::from_pem(&fixture("signer-a.crt"), "crt"),
        Err(SignatureError::BadKey(_))
    ));
    let broken = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    assert!(matches!(
        Signer::from_pem(broken, "broken"),
        Err(SignatureError::BadKey(_))
    ));
    let missing = Signer::load(Path::new("/nonexistent/shacachefs/key.pem"));
    assert!(matches!(missing, Err(SignatureError::Read { .. })));
}

#[test]
fn key_next_to_a_certificate_in_one_file_loads() {
    let both = format!(
        "{}{}",
        fixture("signer-a.crt"),
        fixture("signer-a.pkcs1.key")
    );
    let signer = Signer::from_pem(&both, "both").unwrap();
    assert_eq!(
        signer.sign(&fixture("entry-a.json")),
        fixture("entry-a.sig").trim()
    );
}

#[test]
fn openssl_signature_equals_ours() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let message = "{\"sha512\": \"abc\", \"file\": \"caf\\u00e9\"}";
    std::fs::write(&data, message).unwrap();
    let key = fixture_path("signer-a.pkcs8.key");
    let out = openssl(&[
        "dgst",
        "-sha1",
        "-sign",
        key.to_str().unwrap(),
        data.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let theirs = base64::engine::general_purpose::STANDARD.encode(&out.stdout);
    assert_eq!(signer_a().sign(message), theirs);
}

#[test]
fn generated_key_round_trips() {
    let (key_pem, cert_pem) = generated();
    assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let signer = Signer::from_pem(key_pem, "generated").unwrap();
    let (v, warnings) = Verifier::from_pems(std::slice::from_ref(cert_pem));
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(&*v.certs[0].subject, "shacachefs test, \"quoted\"");
    signer.check_trusted(&v, "generated").unwrap();
    let inner = "{\"sha512\": \"00\"}";
    let sig = signer.sign(inner);
    assert!(v.verify(inner, &sig).is_some());
    assert!(verifier(&["signer-a.crt"]).verify(inner, &sig).is_none());
}

#[test]
fn openssl_accepts_the_generated_certificate() {
    let (key_pem, cert_pem) = generated();
    let dir = tempfile::tempdir().unwrap();
    let crt = dir.path().join("gen.crt");
    let key = dir.path().join("gen.key");
    std::fs::write(&crt, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    let crt = crt.to_str().unwrap();

    let out = openssl(&[
        "x509", "-in", crt, "-noout", "-subject", "-enddate", "-text",
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("shacachefs test"), "{text}");
    assert!(text.contains("sha256WithRSAEncryption"), "{text}");
    assert!(text.contains("Version: 3"), "{text}");
    let year_now = 1970
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 31_556_952;
    let end = text
        .lines()
        .find_map(|l| l.strip_prefix("notAfter="))
        .unwrap();
    let end_year: u64 = end
        .split_whitespace()
        .nth(3)
        .and_then(|y| y.parse().ok())
        .unwrap_or_else(|| panic!("{end}"));
    assert!(
        (year_now + 99..=year_now + 101).contains(&end_year),
        "{end}"
    );

    let out = openssl(&["verify", "-CAfile", crt, crt]);
    assert!(out.status.success(), "{out:?}");

    // The certificate's key is the generated private key's.
    let from_cert = openssl(&["x509", "-in", crt, "-noout", "-pubkey"]);
    let from_key = openssl(&["pkey", "-in", key.to_str().unwrap(), "-pubout"]);
    assert!(from_cert.status.success() && from_key.status.success());
    assert_eq!(from_cert.stdout, from_key.stdout);
}

#[test]
fn generate_refuses_small_keys_and_empty_names() {
    assert!(matches!(generate(512, "x"), Err(SignatureError::Keygen(_))));
    assert!(matches!(generate(2048, ""), Err(SignatureError::Keygen(_))));
}
