//! Publishing as the fixture signers do: a client signing with a fixture signer,
//! publishing a blob with its entry, and a reading configuration trusting the
//! certificates of the test.

use serde_json::{Map, Value};
use shacachefs::client::Client;
use shacachefs::config::Config;
use shacachefs::digest::Sha512;
use shacachefs::remote::Limits;
use shacachefs::signature::Signer;
use shacachefs::wire::RawEntry;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The subject of the fixture signer A's certificate, as `user.shadir.signer` shows it.
pub const CN_A: &str = "shacachefs-fixture-a";
/// The same for signer B.
pub const CN_B: &str = "shacachefs-fixture-b";

/// A file under `tests/fixtures/signature/`.
pub fn signature_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/signature")
        .join(name)
}

/// Signer A's certificate (PEM text).
pub fn cert_a() -> String {
    std::fs::read_to_string(signature_fixture("signer-a.crt")).expect("signer-a.crt")
}

/// Signer A (the private key of `cert_a`).
pub fn signer_a() -> Signer {
    Signer::load(&signature_fixture("signer-a.pkcs1.key")).expect("fixture signer A")
}

/// Signer B's certificate (PEM text).
pub fn cert_b() -> String {
    std::fs::read_to_string(signature_fixture("signer-b.crt")).expect("signer-b.crt")
}

/// Who signs what a publisher publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    A,
    B,
    /// Unsigned entries (signature `""`).
    Nobody,
}

/// Short timeouts and few retries, so that tests of failures stay fast.
pub fn quick_limits() -> Limits {
    Limits {
        connect_timeout: Duration::from_secs(2),
        low_speed_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(10),
        attempts: 2,
        backoff: Duration::from_millis(20),
        ..Limits::default()
    }
}

/// A client that uploads to (and downloads from) the given bases, signing with `who`.
pub fn publisher(cache_url: &str, dir_url: &str, who: Who) -> Client {
    let (key, certs) = match who {
        Who::A => (
            Some(signature_fixture("signer-a.pkcs1.key")),
            vec![cert_a()],
        ),
        Who::B => (Some(signature_fixture("signer-b.key")), vec![cert_b()]),
        Who::Nobody => (None, Vec::new()),
    };
    let cfg = Config {
        source: PathBuf::from("(test publisher)"),
        download_cache_url: Some(cache_url.to_string()),
        download_dir_url: Some(dir_url.to_string()),
        upload_cache_url: Some(cache_url.to_string()),
        upload_dir_url: Some(dir_url.to_string()),
        signature_private_key_file: key,
        signature_certificates: certs,
        ..Config::default()
    };
    Client::from_config(&cfg, quick_limits()).expect("publisher client")
}

/// A read-only configuration trusting `certs` (none: every entry unverified).
pub fn reader_config(cache_url: &str, dir_url: &str, certs: Vec<String>) -> Config {
    Config {
        source: PathBuf::from("(test reader)"),
        download_cache_url: Some(cache_url.to_string()),
        download_dir_url: Some(dir_url.to_string()),
        signature_certificates: certs,
        ..Config::default()
    }
}

/// `serde_json::json!` object → metadata map.
pub fn meta(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("metadata must be an object, got {other}"),
    }
}

/// Uploads the file at `path` (streamed from disk) and publishes its entry under `key`.
pub async fn publish_file(client: &Client, key: &str, path: &Path, metadata: Value) -> Sha512 {
    let (sha, _) = Sha512::of_file(path).expect("hashing the file to publish");
    client
        .ensure_blob(path, &sha, &std::env::temp_dir(), &|_, _| {})
        .await
        .expect("uploading a blob");
    client
        .store
        .put_dir(key, &client.make_entry(&sha, &meta(metadata)))
        .await
        .expect("publishing an entry");
    sha
}

/// Uploads `data` and publishes its entry under `key`.
pub async fn publish(client: &Client, key: &str, data: &[u8], metadata: Value) -> Sha512 {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("blob");
    std::fs::write(&path, data).expect("writing the blob to publish");
    publish_file(client, key, &path, metadata).await
}

/// Uploads `data` only (no entry).
pub async fn upload_blob(client: &Client, data: &[u8]) -> Sha512 {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("blob");
    std::fs::write(&path, data).expect("writing the blob to upload");
    let sha = Sha512::of(data);
    client
        .ensure_blob(&path, &sha, dir.path(), &|_, _| {})
        .await
        .expect("uploading a blob");
    sha
}

/// Publishes an entry whose `inner` text is given as is, signed by the publisher's key
/// (or unsigned when it has none).
pub async fn publish_raw_inner(client: &Client, key: &str, inner: &str) {
    let signature = client
        .signer
        .as_ref()
        .map(|s| s.sign(inner))
        .unwrap_or_default();
    let entry = RawEntry {
        inner: inner.to_string(),
        signature,
    };
    client
        .store
        .put_dir(key, &entry)
        .await
        .expect("publishing a raw entry");
}

/// Rewrites the server-side list of a key (a JSON array of `[inner, signature]`): the
/// first entry whose inner contains `needle` gets `needle` replaced by `replacement`
/// while its signature stays, so that no certificate verifies it any more.
pub fn tamper_key_file(path: &Path, needle: &str, replacement: &str) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read the key file {}: {e}", path.display()));
    let mut list: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("key file {} is not JSON: {e}", path.display()));
    let entries = list.as_array_mut().expect("a key file is a JSON array");
    let target = entries
        .iter_mut()
        .find(|e| e[0].as_str().is_some_and(|s| s.contains(needle)))
        .unwrap_or_else(|| panic!("no entry containing {needle:?} in {}", path.display()));
    let inner = target[0].as_str().expect("inner is a string");
    target[0] = Value::String(inner.replacen(needle, replacement, 1));
    std::fs::write(path, serde_json::to_string(&list).expect("JSON"))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Overwrites a stored blob with other bytes of the same length.
pub fn corrupt_file(path: &Path) {
    let mut data =
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(!data.is_empty(), "cannot corrupt an empty blob");
    for b in data.iter_mut().take(64) {
        *b ^= 0x5a;
    }
    std::fs::write(path, &data).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
