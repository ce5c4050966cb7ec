//! The network cache client: the HTTP client plus trust. Selects the entries of a key
//! that the configured certificates verify, and publishes blobs with signed entries.
//! Commands and the filesystem core use this, never `remote` and `signature` apart.

use crate::config::Config;
use crate::digest::Sha512;
use crate::naming::Nameable;
use crate::remote::{
    unbounded, DirListing, Limits, Probe, Progress, Remote, RemoteConfig, RemoteError,
};
use crate::signature::{SignatureError, Signer, Verifier};
use crate::store::Store;
use crate::wire::{build_inner, EntryInfo, Listing, RawEntry};
use serde_json::{Map, Value};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Who vouches for an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignedBy {
    /// The subject of the certificate that verified it (shared with the certificate:
    /// one allocation for all the entries it verified).
    Certificate(Arc<str>),
    /// No certificate is configured: nothing was checked.
    Unverified,
}

impl SignedBy {
    /// `user.shadir.signer`: the certificate's subject, or `unverified`.
    pub fn label(&self) -> &str {
        match self {
            SignedBy::Certificate(s) => s,
            SignedBy::Unverified => "unverified",
        }
    }
}

/// An entry that passed the trust check and whose inner JSON is well formed. Only
/// [`select_trusted`] makes these.
#[derive(Debug, Clone)]
pub struct TrustedEntry {
    pub raw: RawEntry,
    pub info: EntryInfo,
    pub signer: SignedBy,
}

impl Nameable for TrustedEntry {
    fn sha512(&self) -> Sha512 {
        self.info.sha512
    }
    fn metadata(&self) -> &Map<String, Value> {
        &self.info.metadata
    }
}

/// An entry left out, and why (logged at debug level by callers).
#[derive(Debug, Clone)]
pub struct Hidden {
    pub reason: String,
    /// The start of the inner string, for the log.
    pub excerpt: String,
}

/// Keeps the entries that a certificate verifies (all, when none is configured) and whose
/// inner JSON names a valid blob, in the server's order.
pub fn select_trusted(listing: Listing, verifier: &Verifier) -> (Vec<TrustedEntry>, Vec<Hidden>) {
    let mut hidden: Vec<Hidden> = listing
        .rejected
        .iter()
        .map(|e| Hidden {
            reason: e.to_string(),
            excerpt: match e {
                crate::wire::WireError::LoneSurrogate(excerpt) => excerpt.clone(),
                _ => String::new(),
            },
        })
        .collect();
    let n = listing.entries.len();
    let threads = if n >= PARALLEL_FROM {
        std::thread::available_parallelism().map_or(1, |t| t.get().min(4))
    } else {
        1
    };
    if threads <= 1 {
        let (trusted, more) = select_chunk(listing.entries, verifier);
        hidden.extend(more);
        return (trusted, hidden);
    }
    // A big listing: its chunks verified and parsed on the cores there are (a cold
    // 20,000-entry key spent most of its listing time here), results in the server's
    // order.
    let mut rest = listing.entries;
    let per = n.div_ceil(threads);
    let mut chunks = Vec::with_capacity(threads);
    while rest.len() > per {
        let tail = rest.split_off(per);
        chunks.push(std::mem::replace(&mut rest, tail));
    }
    chunks.push(rest);
    // Each chunk is taken by whoever processes it: its thread, or this one when no
    // thread could be started.
    let slots: Vec<Mutex<Option<Vec<RawEntry>>>> =
        chunks.into_iter().map(|c| Mutex::new(Some(c))).collect();
    let take = |slot: &Mutex<Option<Vec<RawEntry>>>| {
        slot.lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default()
    };
    let results = std::thread::scope(|s| {
        let others: Vec<_> = slots[1..]
            .iter()
            .map(|slot| {
                let started = std::thread::Builder::new()
                    .name("verify".into())
                    .spawn_scoped(s, || select_chunk(take(slot), verifier));
                (slot, started.ok())
            })
            .collect();
        let mut results = vec![select_chunk(take(&slots[0]), verifier)];
        for (slot, handle) in others {
            results.push(match handle {
                Some(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                None => select_chunk(take(slot), verifier),
            });
        }
        results
    });
    let mut trusted = Vec::with_capacity(n);
    for (t, h) in results {
        trusted.extend(t);
        hidden.extend(h);
    }
    (trusted, hidden)
}

/// Listings at least this long are verified on several threads.
const PARALLEL_FROM: usize = 1000;

/// [`select_trusted`] of some entries, in order.
fn select_chunk(entries: Vec<RawEntry>, verifier: &Verifier) -> (Vec<TrustedEntry>, Vec<Hidden>) {
    let mut hidden = Vec::new();
    let mut trusted = Vec::with_capacity(entries.len());
    let excerpt = |raw: &RawEntry| -> String { raw.inner.chars().take(120).collect() };
    for raw in entries {
        let signer = if verifier.is_empty() {
            SignedBy::Unverified
        } else {
            match verifier.verify(&raw.inner, &raw.signature) {
                Some(cert) => SignedBy::Certificate(cert.subject.clone()),
                None => {
                    let reason = if raw.signature.is_empty() {
                        "unsigned"
                    } else {
                        "no trusted certificate verifies its signature"
                    };
                    hidden.push(Hidden {
                        reason: reason.into(),
                        excerpt: excerpt(&raw),
                    });
                    continue;
                }
            }
        };
        match EntryInfo::parse(&raw.inner) {
            Ok(info) => trusted.push(TrustedEntry { raw, info, signer }),
            Err(e) => hidden.push(Hidden {
                reason: e.to_string(),
                excerpt: excerpt(&raw),
            }),
        }
    }
    (trusted, hidden)
}

/// Why a client could not be set up or could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("{0}")]
    Setup(String),
}

/// Remote + trust + signing key.
#[derive(Clone)]
pub struct Client {
    /// shacache and shadir (the real servers, or a test double).
    pub store: Arc<dyn Store>,
    pub verifier: Verifier,
    pub signer: Option<Signer>,
    /// Warnings from loading (skipped certificates, …), for the caller to log.
    pub warnings: Vec<String>,
}

impl Client {
    /// Builds the client a configuration describes. Refuses a signing key that no
    /// trusted certificate matches, as the reference client does (when a download
    /// directory is configured: otherwise nothing would ever be checked).
    pub fn from_config(cfg: &Config, limits: Limits) -> Result<Client, ClientError> {
        let remote = Remote::new(RemoteConfig {
            download_cache_url: cfg.download_cache_url.clone(),
            download_dir_url: cfg.download_dir_url.clone(),
            upload_cache_url: cfg.upload_cache_url.clone(),
            upload_dir_url: cfg.upload_dir_url.clone(),
            shacache_tls: cfg.shacache_tls.clone(),
            shadir_tls: cfg.shadir_tls.clone(),
            limits,
        })?;
        let (verifier, mut warnings) = Verifier::from_pems(&cfg.signature_certificates);
        // A configured list fails closed: with none of its certificates usable, running
        // would show unsigned entries as if no list had been configured.
        if verifier.is_empty() && !cfg.signature_certificates.is_empty() {
            return Err(ClientError::Setup(format!(
                "none of the {} certificate(s) in signature-certificate-list is usable, so no \
                 entry could be verified; refusing to run unverified (fix the list, or remove \
                 it to show unsigned entries): {}",
                cfg.signature_certificates.len(),
                warnings.join("; ")
            )));
        }
        warnings.extend(cfg.notices.iter().cloned());
        let signer = match &cfg.signature_private_key_file {
            Some(path) => {
                let signer = Signer::load(path)?;
                if cfg.download_dir_url.is_some() && !verifier.trusts(&signer.public_key()) {
                    return Err(
                        SignatureError::NoMatchingCertificate(path.display().to_string()).into(),
                    );
                }
                Some(signer)
            }
            None => None,
        };
        Ok(Client {
            store: Arc::new(remote),
            verifier,
            signer,
            warnings,
        })
    }

    /// The trusted entries of a key; `None` when shadir has never heard of it (404).
    pub async fn select(
        &self,
        key: &str,
    ) -> Result<Option<(Vec<TrustedEntry>, Vec<Hidden>)>, RemoteError> {
        match self.store.get_dir(key).await? {
            DirListing::Missing => Ok(None),
            DirListing::Found(listing) => Ok(Some(select_trusted(listing, &self.verifier))),
        }
    }

    /// Makes sure shacache holds the blob in `path` (whose hash is `sha`): a blob of up
    /// to [`SEND_WITHOUT_PROBE`] bytes is POSTed at once; a bigger one is probed first
    /// (only a 404 counts as absent) and POSTed when absent. Returns true when it was
    /// uploaded.
    pub async fn ensure_blob(
        &self,
        path: &Path,
        sha: &Sha512,
        tmp_dir: &Path,
        progress: Progress<'_>,
    ) -> Result<bool, RemoteError> {
        // A small blob is sent without asking first: its bytes cost less than the
        // probe's round trip (shacache stores a blob it has once, whatever the POSTs),
        // and a `cp` of many small files saves one request in three.
        if std::fs::metadata(path).is_ok_and(|m| m.len() <= SEND_WITHOUT_PROBE) {
            self.store.post_blob(path, sha, progress).await?;
            return Ok(true);
        }
        match self.store.probe_blob(sha, tmp_dir, &unbounded).await? {
            Probe::Size(_) | Probe::Fetched(_) => Ok(false),
            Probe::Absent => {
                self.store.post_blob(path, sha, progress).await?;
                Ok(true)
            }
        }
    }

    /// The signed entry for a blob and its metadata, as the reference client writes it.
    pub fn make_entry(&self, sha: &Sha512, metadata: &Map<String, Value>) -> RawEntry {
        sign_entry(self.signer.as_ref(), sha, metadata)
    }
}

/// The entry for a blob and its metadata, signed by `signer` (unsigned without one).
pub fn sign_entry(
    signer: Option<&Signer>,
    sha: &Sha512,
    metadata: &Map<String, Value>,
) -> RawEntry {
    let inner = build_inner(sha, metadata);
    let signature = signer.map(|s| s.sign(&inner)).unwrap_or_default();
    RawEntry { inner, signature }
}

/// Blobs up to this size are uploaded without a probe first (see `Client::ensure_blob`).
pub use crate::remote::SMALL_BLOB as SEND_WITHOUT_PROBE;

/// The `.entries.json` / `ls --json` document: `[{"name", "sha512", "metadata",
/// "signer"}]` in name order.
pub fn entries_json(files: &[(String, TrustedEntry)]) -> Value {
    Value::Array(
        files
            .iter()
            .map(|(name, e)| {
                let mut o = Map::new();
                o.insert("name".into(), Value::String(name.clone()));
                o.insert("sha512".into(), Value::String(e.info.sha512.hex()));
                o.insert("metadata".into(), Value::Object(e.info.metadata.clone()));
                o.insert("signer".into(), Value::String(e.signer.label().to_string()));
                Value::Object(o)
            })
            .collect(),
    )
}

/// The `.entries.json` file's text: exactly `pyjson::dumps_with(&entries_json(files),
/// indent 2)` and a newline, written piece by piece. Building the [`entries_json`]
/// `Value` first clones every entry's metadata: for a key of 20,000 entries that
/// document was 28 MB of the daemon's 113 MB heap peak (heaptrack, BENCHMARKS.md).
pub fn entries_json_text<'a, N, E>(files: impl ExactSizeIterator<Item = (&'a N, &'a E)>) -> String
where
    N: AsRef<str> + ?Sized + 'a,
    E: std::borrow::Borrow<TrustedEntry> + 'a,
{
    use crate::pyjson::{write_object, write_string, Style};
    let style = Style {
        indent: Some(2),
        sort_keys: false,
    };
    let n = files.len();
    if n == 0 {
        return "[]\n".to_string();
    }
    let mut out = String::with_capacity(n * 512);
    out.push('[');
    for (i, (name, e)) in files.enumerate() {
        let e: &TrustedEntry = e.borrow();
        if i > 0 {
            out.push(',');
        }
        out.push_str("\n  {\n    \"name\": ");
        write_string(&mut out, name.as_ref());
        out.push_str(",\n    \"sha512\": \"");
        out.push_str(&e.info.sha512.hex());
        out.push_str("\",\n    \"metadata\": ");
        write_object(&mut out, &e.info.metadata, style, 2);
        out.push_str(",\n    \"signer\": ");
        write_string(&mut out, e.signer.label());
        out.push_str("\n  }");
    }
    out.push_str("\n]\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/tests/fixtures/signature/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    /// A big listing is selected on several threads: the same entries, in the same
    /// order, as one thread gives, untrusted and unparsable ones hidden.
    #[test]
    fn a_big_listing_is_selected_in_parallel_in_order() {
        let dir = |n: &str| {
            format!(
                "{}/tests/fixtures/signature/{n}",
                env!("CARGO_MANIFEST_DIR")
            )
        };
        let a = Signer::load(std::path::Path::new(&dir("signer-a.pkcs8.key"))).unwrap();
        let b = Signer::load(std::path::Path::new(&dir("signer-b.key"))).unwrap();
        let (verifier, _) = Verifier::from_pems(&[fixture("signer-a.crt")]);
        let n = PARALLEL_FROM + 501;
        let entries: Vec<RawEntry> = (0..n)
            .map(|i| {
                let mut meta = Map::new();
                meta.insert("file".into(), Value::String(format!("f{i}")));
                let inner = if i % 97 == 5 {
                    "{\"sha512\": \"not hex\"}".to_string()
                } else {
                    crate::wire::build_inner(&Sha512::of(format!("{i}").as_bytes()), &meta)
                };
                let signer = if i % 10 == 3 { &b } else { &a };
                RawEntry {
                    signature: signer.sign(&inner),
                    inner,
                }
            })
            .collect();
        let listing = Listing {
            entries: entries.clone(),
            rejected: Vec::new(),
        };
        let (one_t, one_h) =
            select_chunk(entries, &Verifier::from_pems(&[fixture("signer-a.crt")]).0);
        let (many_t, many_h) = select_trusted(listing, &verifier);
        let raws = |v: &[TrustedEntry]| v.iter().map(|e| e.raw.clone()).collect::<Vec<_>>();
        assert_eq!(raws(&many_t), raws(&one_t));
        assert_eq!(many_h.len(), one_h.len());
        assert!(!one_h.is_empty() && one_t.len() + one_h.len() == n);
    }

    #[test]
    fn trust_filter_matches_reference_verdicts() {
        let body = fixture("shadir-response.json");
        let listing = crate::wire::parse_listing(body.as_bytes()).unwrap();
        let (ab, _) = Verifier::from_pems(&[fixture("signer-a.crt"), fixture("signer-b.crt")]);
        let (a, _) = Verifier::from_pems(&[fixture("signer-a.crt")]);
        let (shown, hidden) = select_trusted(listing.clone(), &ab);
        assert_eq!(shown.len(), 2);
        assert_eq!(hidden.len(), 2);
        assert_eq!(
            shown[0].signer,
            SignedBy::Certificate("shacachefs-fixture-a".into())
        );
        assert_eq!(
            shown[1].signer,
            SignedBy::Certificate("shacachefs-fixture-b".into())
        );
        let (shown, _) = select_trusted(listing.clone(), &a);
        assert_eq!(shown.len(), 1);
        let (shown, hidden) = select_trusted(listing, &Verifier::default());
        assert_eq!(shown.len(), 4);
        assert!(hidden.is_empty());
        assert!(shown.iter().all(|e| e.signer == SignedBy::Unverified));
    }

    #[test]
    fn entries_share_their_certificate_subject() {
        let body = fixture("shadir-response.json");
        let listing = crate::wire::parse_listing(body.as_bytes()).unwrap();
        let (a, _) = Verifier::from_pems(&[fixture("signer-a.crt")]);
        let mut doubled = listing.clone();
        doubled.entries.extend(listing.entries.iter().cloned());
        let (shown, _) = select_trusted(doubled, &a);
        assert_eq!(shown.len(), 2);
        let subject = |e: &TrustedEntry| match &e.signer {
            SignedBy::Certificate(s) => s.clone(),
            SignedBy::Unverified => panic!("verified"),
        };
        // One allocation, the certificate's, for every entry it verified.
        assert!(Arc::ptr_eq(&subject(&shown[0]), &subject(&shown[1])));
        assert!(Arc::ptr_eq(&subject(&shown[0]), &a.certs[0].subject));
    }

    #[test]
    fn entries_json_text_is_the_pretty_document() {
        let entry = |inner: &str, signer: SignedBy| TrustedEntry {
            raw: RawEntry {
                inner: inner.into(),
                signature: String::new(),
            },
            info: EntryInfo::parse(inner).unwrap(),
            signer,
        };
        let sha = Sha512::of(b"x").hex();
        let files = [
            (
                "a.bin".to_string(),
                entry(
                    &format!(r#"{{"sha512": "{sha}", "file": "a.bin", "timestamp": 1.5}}"#),
                    SignedBy::Certificate("C\u{e9} \"q\"".into()),
                ),
            ),
            (
                "\u{e9}t\u{e9}~1".to_string(),
                entry(
                    &format!(
                        r#"{{"sha512": "{sha}", "os": ["debian", 12, {{"x": null}}], "e": {{}}, "n": 10000000000000000000000}}"#
                    ),
                    SignedBy::Unverified,
                ),
            ),
        ];
        let style = crate::pyjson::Style {
            indent: Some(2),
            sort_keys: false,
        };
        for n in 0..=files.len() {
            let want = crate::pyjson::dumps_with(&entries_json(&files[..n]), style) + "\n";
            let pairs = files[..n].iter().map(|(n, e)| (n, e));
            assert_eq!(entries_json_text(pairs), want, "{n} entries");
        }
    }
}
