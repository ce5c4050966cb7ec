//! `shacachefs upload`: the job of `networkcache-upload`, with its flags and metadata
//! rules: `-m FILE` (a JSON dictionary), then `KEY=VALUE` strings; with `-u URL` and no
//! `-k` the key is `file-urlmd5:md5(URL)` and `url` is added to the metadata; `-f` with
//! neither `-k` nor `-u` uploads the blob only. The blob's SHA-512 is printed.

use super::{client_for, load_config, progress_bar, track};
use crate::cli::UploadArgs;
use crate::digest::Sha512;
use crate::wire::urlmd5_key;
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::PathBuf;

/// The metadata dictionary from `-m` and the `KEY=VALUE` arguments, in that order.
pub fn collect_metadata(
    metadata_file: Option<&PathBuf>,
    pairs: &[String],
) -> Result<Map<String, Value>> {
    let mut meta = match metadata_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(m)) => m,
                Ok(_) => bail!("Not a dictionary: {}", path.display()),
                Err(e) => bail!("{}: {e}", path.display()),
            }
        }
        None => Map::new(),
    };
    for pair in pairs {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("metadata {pair:?} is not KEY=VALUE");
        };
        meta.insert(k.to_string(), Value::String(v.to_string()));
    }
    Ok(meta)
}

pub async fn run(args: UploadArgs) -> Result<()> {
    let cfg = load_config(args.config.config.as_deref())?;
    let client = client_for(&cfg)?;
    if !client.store.can_upload() {
        bail!(
            "{}: upload-cache-url and upload-dir-url are required to upload",
            cfg.source.display()
        );
    }
    let path = match (&args.file, &args.url) {
        (Some(f), _) => f.clone(),
        (None, Some(u)) if std::path::Path::new(u).is_file() => PathBuf::from(u),
        (None, Some(u)) => bail!(
            "--url {u}: fetching the content of a URL is not supported; download it and pass --file"
        ),
        (None, None) => bail!("either --file or --url is required"),
    };
    let mut meta = collect_metadata(args.metadata.as_ref(), &args.meta)?;
    let key = match (&args.key, &args.url) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(u)) => {
            meta.entry("url")
                .or_insert_with(|| Value::String(u.clone()));
            Some(urlmd5_key(u))
        }
        (None, None) => None,
    };
    if key.is_some() && meta.is_empty() {
        bail!("metadata should not be empty (give KEY=VALUE, e.g. file=NAME)");
    }

    let hash_path = path.clone();
    let (sha, size) = tokio::task::spawn_blocking(move || Sha512::of_file(&hash_path))
        .await?
        .with_context(|| format!("cannot read {}", path.display()))?;
    let bar = progress_bar("upload");
    bar.set_length(size);
    let tmp = std::env::temp_dir();
    let uploaded = client.ensure_blob(&path, &sha, &tmp, &track(&bar)).await?;
    bar.finish_and_clear();
    tracing::info!(
        "{}: blob {} {}",
        path.display(),
        sha.short(16),
        if uploaded {
            "uploaded"
        } else {
            "already in shacache"
        }
    );
    if let Some(key) = key {
        let entry = client.make_entry(&sha, &meta);
        client.store.put_dir(&key, &entry).await?;
        tracing::info!("published {} under key {key}", sha.short(16));
    }
    println!("{sha}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_file_then_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.json");
        std::fs::write(&f, r#"{"os": ["debian", 12], "file": "a"}"#).unwrap();
        let m = collect_metadata(Some(&f), &["file=b".into(), "x=1=2".into()]).unwrap();
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"os":["debian",12],"file":"b","x":"1=2"}"#
        );
        std::fs::write(&f, "[1]").unwrap();
        assert!(collect_metadata(Some(&f), &[])
            .unwrap_err()
            .to_string()
            .contains("Not a dictionary"));
        assert!(collect_metadata(None, &["novalue".into()]).is_err());
    }
}
