//! Publishing one outbox item, for the mount's `close()` and for `outbox retry`:
//! blob first (only a 404 counts as absent, then POST with the echoed hash checked),
//! entry second (signed, saved in the outbox, then PUT with 201 checked). A failure is
//! recorded in the item, whose data stays in the outbox untouched.

use crate::client::{sign_entry, Client};
use crate::digest::Sha512;
use crate::outbox::Outbox;
use crate::remote::{Progress, RemoteError};
use crate::wire::RawEntry;
use serde_json::{Map, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// What was published.
#[derive(Debug, Clone)]
pub struct Published {
    pub sha: Sha512,
    pub len: u64,
    pub key: String,
    pub name: String,
    pub entry: RawEntry,
    /// False when shacache already had the blob.
    pub uploaded: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("staged file: {0}")]
    Io(#[from] std::io::Error),
    #[error("being published by another process")]
    Busy,
    #[error("outbox item {0} is gone")]
    Gone(String),
    #[error("the staged file is incomplete ({0}): write it again")]
    Incomplete(String),
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The metadata of a new entry: `file`, `timestamp`, then the mount's extra fields.
fn entry_metadata(name: &str, extra: &Map<String, Value>) -> Map<String, Value> {
    let mut meta = Map::new();
    meta.insert("file".into(), Value::String(name.to_string()));
    meta.insert("timestamp".into(), Value::from(now()));
    for (k, v) in extra {
        if k != "sha512" && k != "file" && k != "timestamp" {
            meta.insert(k.clone(), v.clone());
        }
    }
    meta
}

/// Publishes item `id` of `outbox` with `client`. `known` is the data's digest and
/// length when the caller hashed it as it was written (sequential writes through the
/// mount); otherwise the staged file is hashed here. `blob`: what the caller already
/// knows of the blob `known` names in shacache: `Some(true)`, it stored exactly these
/// bytes (it checked the hash the server computed); `Some(false)`, shacache had them
/// already; either way only the entry is left to publish. `None`: probe, then upload.
/// `progress` follows the blob's upload (bytes sent, total).
pub async fn publish(
    client: &Client,
    outbox: &Outbox,
    id: &str,
    known: Option<(Sha512, u64)>,
    blob: Option<bool>,
    progress: Progress<'_>,
) -> Result<Published, PublishError> {
    // The lock is on the item's data: none there is an item gone (published and
    // removed by another process meanwhile) unless its metadata is still there.
    let _lock = match outbox.try_lock(id) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && outbox.get(id).is_none() => {
            return Err(PublishError::Gone(id.to_string()));
        }
        r => r?.ok_or(PublishError::Busy)?,
    };
    let mut item = outbox
        .get(id)
        .ok_or_else(|| PublishError::Gone(id.to_string()))?;
    let incomplete = |item: &crate::outbox::Item| {
        PublishError::Incomplete(
            item.meta
                .last_error
                .clone()
                .unwrap_or_else(|| "a write into it failed".to_string()),
        )
    };
    if outbox.is_incomplete(id) {
        return Err(incomplete(&item));
    }
    let path = outbox.data_path(id);
    let on_disk = std::fs::metadata(&path)?.len();
    let blob = blob.filter(|_| known.is_some_and(|(_, len)| len == on_disk));
    let (sha, len) = match known {
        Some((sha, len)) if len == on_disk => (sha, len),
        _ => {
            let p = path.clone();
            tokio::task::spawn_blocking(move || Sha512::of_file(&p))
                .await
                .map_err(std::io::Error::other)??
        }
    };
    // The entry is signed on a blocking thread (RSA is the costliest step of a small
    // file's publish) while the blob goes up; it is saved in the item before the PUT,
    // so that a retry publishes this very entry.
    let reuse = match item.meta.signed_entry() {
        Some(e) if item.meta.sha512.as_deref() == Some(sha.hex().as_str()) => Some(e),
        _ => None,
    };
    let metadata = entry_metadata(&item.meta.name, &item.meta.extra);
    let signing = async {
        match reuse {
            Some(e) => Ok((e, false)),
            None => {
                let signer = client.signer.clone();
                tokio::task::spawn_blocking(move || {
                    (sign_entry(signer.as_ref(), &sha, &metadata), true)
                })
                .await
                .map_err(std::io::Error::other)
            }
        }
    };
    let upload = async {
        match blob {
            Some(uploaded) => Ok(uploaded),
            None => {
                client
                    .ensure_blob(&path, &sha, outbox.dir(), progress)
                    .await
            }
        }
    };
    let (signed, uploaded) = tokio::join!(signing, upload);
    let (entry, signed_now) = signed?;
    if signed_now {
        item.meta.sha512 = Some(sha.hex());
        item.meta.entry = Some((entry.inner.clone(), entry.signature.clone()));
        outbox.save(&item)?;
    }
    let key = item.meta.key.clone();
    let attempt = async {
        let uploaded = uploaded?;
        // Once more just before the entry goes out: a write may have failed meanwhile.
        if outbox.is_incomplete(id) {
            return Ok(None);
        }
        client.store.put_dir(&key, &entry).await?;
        Ok::<Option<bool>, RemoteError>(Some(uploaded))
    }
    .await;
    match attempt {
        Ok(None) => Err(incomplete(&item)),
        Ok(Some(uploaded)) => Ok(Published {
            sha,
            len,
            key,
            name: item.meta.name.clone(),
            entry,
            uploaded,
        }),
        Err(e) => {
            item.meta.last_error = Some(e.to_string());
            let _ = outbox.save(&item);
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_order_and_reserved_fields() {
        let mut extra = Map::new();
        extra.insert("os".into(), "debian".into());
        extra.insert("file".into(), "ignored".into());
        let m = entry_metadata("a.tgz", &extra);
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        assert_eq!(keys, vec!["file", "timestamp", "os"]);
        assert_eq!(m["file"], "a.tgz");
        assert!(m["timestamp"].as_f64().unwrap() > 1.7e9);
    }
}
