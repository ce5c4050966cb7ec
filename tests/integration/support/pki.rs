//! A throw-away PKI written with the crate's own x509 builder (no `openssl` command): an
//! RSA-2048 CA and, signed by it, server and client certificates as the TLS tests need
//! them, written as PEM files in a temporary directory (`ca.pem`, `NAME.pem`,
//! `NAME.key`).
//!
//! [`Pki::v1_client`] makes the legacy SlapOS shape (an X.509 version 1 certificate,
//! no extensions, a PKCS#1 key of any size such as RSA-1024): the builder always writes
//! version 3, so that one is assembled from its `TbsCertificate` and signed here.

use der::asn1::{BitString, Ia5String, ObjectIdentifier, OctetString};
use der::pem::LineEnding;
use der::{Encode, EncodePem};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::EncodePrivateKey;
use rsa::signature::{SignatureEncoding, Signer};
use rsa::RsaPrivateKey;
use spki::{DynSignatureAlgorithmIdentifier, SubjectPublicKeyInfoOwned};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::certificate::{Certificate, TbsCertificate, Version};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{ExtendedKeyUsage, SubjectAltName};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::Validity;

const SERVER_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.1");
const CLIENT_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.2");
const VALIDITY: Duration = Duration::from_secs(2 * 86_400);

type CaSigner = rsa::pkcs1v15::SigningKey<sha2::Sha256>;

/// A CA and the certificates it signed, as files in a temporary directory.
pub struct Pki {
    dir: tempfile::TempDir,
    ca_name: Name,
    ca_signer: CaSigner,
    serial: std::cell::Cell<u8>,
}

fn rsa_key(bits: usize) -> RsaPrivateKey {
    RsaPrivateKey::new(&mut rand::thread_rng(), bits).expect("RSA key generation")
}

fn spki_of(key: &RsaPrivateKey) -> SubjectPublicKeyInfoOwned {
    SubjectPublicKeyInfoOwned::from_key(key.to_public_key()).expect("public key encoding")
}

fn name(cn: &str) -> Name {
    Name::from_str(&format!("CN={cn}")).expect("a CN without special characters")
}

impl Pki {
    /// A CA (RSA-2048, v3, `basicConstraints CA:TRUE`, `keyCertSign, cRLSign`) named
    /// `CN=ca_cn`, written to `ca.pem` (its key stays in memory).
    pub fn new(ca_cn: &str) -> Pki {
        let dir = super::tempdir();
        let key = rsa_key(2048);
        let ca_name = name(ca_cn);
        let ca_signer = CaSigner::new(key.clone());
        let builder = CertificateBuilder::new(
            Profile::Root,
            SerialNumber::from(1u32),
            Validity::from_now(VALIDITY).expect("validity"),
            ca_name.clone(),
            spki_of(&key),
            &ca_signer,
        )
        .expect("CA certificate");
        let cert = builder
            .build::<rsa::pkcs1v15::Signature>()
            .expect("CA signature");
        let pki = Pki {
            dir,
            ca_name,
            ca_signer,
            serial: std::cell::Cell::new(1),
        };
        pki.write("ca.pem", &cert.to_pem(LineEnding::LF).expect("PEM"));
        pki
    }

    /// A file of the PKI (`ca.pem`, `NAME.pem`, `NAME.key`).
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.path(file), text).expect("writing a PKI file");
    }

    fn next_serial(&self) -> SerialNumber {
        self.serial.set(self.serial.get() + 1);
        SerialNumber::from(u32::from(self.serial.get()))
    }

    /// A v3 leaf for `key` with `CN=cn`, the extended key usage `eku` and, for a server,
    /// `subjectAltName IP:127.0.0.1, DNS:localhost`.
    fn leaf(&self, file: &str, cn: &str, key: RsaPrivateKey, eku: ObjectIdentifier) {
        let mut builder = CertificateBuilder::new(
            Profile::Leaf {
                issuer: self.ca_name.clone(),
                enable_key_agreement: false,
                enable_key_encipherment: eku == SERVER_AUTH,
            },
            self.next_serial(),
            Validity::from_now(VALIDITY).expect("validity"),
            name(cn),
            spki_of(&key),
            &self.ca_signer,
        )
        .expect("leaf certificate");
        if eku == SERVER_AUTH {
            let ip = OctetString::new(vec![127, 0, 0, 1]).expect("IP address");
            let dns = Ia5String::new("localhost").expect("DNS name");
            builder
                .add_extension(&SubjectAltName(vec![
                    GeneralName::IpAddress(ip),
                    GeneralName::DnsName(dns),
                ]))
                .expect("subjectAltName");
        }
        builder
            .add_extension(&ExtendedKeyUsage(vec![eku]))
            .expect("extendedKeyUsage");
        let cert = builder
            .build::<rsa::pkcs1v15::Signature>()
            .expect("leaf signature");
        self.write(
            &format!("{file}.pem"),
            &cert.to_pem(LineEnding::LF).expect("PEM"),
        );
        let key_pem = key.to_pkcs8_pem(LineEnding::LF).expect("PKCS#8 PEM");
        self.write(&format!("{file}.key"), &key_pem);
    }

    /// `NAME.pem` / `NAME.key`: a server certificate (RSA-2048, PKCS#8) for 127.0.0.1
    /// and localhost, `extendedKeyUsage serverAuth`.
    pub fn server(&self, file: &str) -> &Self {
        self.leaf(file, file, rsa_key(2048), SERVER_AUTH);
        self
    }

    /// `NAME.pem` / `NAME.key`: a v3 client certificate (RSA-2048, PKCS#8) with `CN=cn`
    /// and `extendedKeyUsage clientAuth`.
    pub fn client(&self, file: &str, cn: &str) -> &Self {
        self.leaf(file, cn, rsa_key(2048), CLIENT_AUTH);
        self
    }

    /// `NAME.pem` / `NAME.key`: an X.509 **version 1** client certificate (no extensions)
    /// with `CN=cn` for a `bits`-bit RSA key written as PKCS#1 ("BEGIN RSA PRIVATE KEY"),
    /// as old SlapOS upload credentials were made.
    pub fn v1_client(&self, file: &str, cn: &str, bits: usize) -> &Self {
        let key = rsa_key(bits);
        let tbs = TbsCertificate {
            version: Version::V1,
            serial_number: self.next_serial(),
            signature: self
                .ca_signer
                .signature_algorithm_identifier()
                .expect("signature algorithm"),
            issuer: self.ca_name.clone(),
            validity: Validity::from_now(VALIDITY).expect("validity"),
            subject: name(cn),
            subject_public_key_info: spki_of(&key),
            issuer_unique_id: None,
            subject_unique_id: None,
            extensions: None,
        };
        let signature = self
            .ca_signer
            .sign(&tbs.to_der().expect("TBS encoding"))
            .to_bytes();
        let cert = Certificate {
            signature_algorithm: tbs.signature.clone(),
            tbs_certificate: tbs,
            signature: BitString::from_bytes(&signature).expect("signature bits"),
        };
        self.write(
            &format!("{file}.pem"),
            &cert.to_pem(LineEnding::LF).expect("PEM"),
        );
        let key_pem = key.to_pkcs1_pem(LineEnding::LF).expect("PKCS#1 PEM");
        self.write(&format!("{file}.key"), &key_pem);
        self
    }
}
