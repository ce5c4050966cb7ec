//! `shacachefs upload`: the job of `networkcache-upload`, with its flags and metadata
//! rules: `-m FILE` (a JSON dictionary), then `KEY=VALUE` strings; with `-u URL` and no
//! `-k` the key is `file-urlmd5:md5(URL)` and `url` is added to the metadata; `-f` with
//! neither `-k` nor `-u` uploads the blob only. The blob's SHA-512 is printed.
//! Beyond the reference client: several files (`-f` repeated, `--files-from LIST`) become
//! one entry each under one key, named after the file, `--jobs` in flight at once (what
//! `scripts/bench` loads its 20,000-entry key with).

use super::{client_for, count_bar, load_config, progress_bar, track};
use crate::cli::UploadArgs;
use crate::client::Client;
use crate::digest::Sha512;
use crate::wire::urlmd5_key;
use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use serde_json::{Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// The files named by `-f` (in order), then those listed in `--files-from` (one a line,
/// blank lines skipped; `-` reads standard input).
pub fn collect_files(args: &UploadArgs) -> Result<Vec<PathBuf>> {
    let mut files = args.file.clone();
    if let Some(list) = &args.files_from {
        let text = if list.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("cannot read standard input")?
        } else {
            std::fs::read_to_string(list)
                .with_context(|| format!("cannot read {}", list.display()))?
        };
        files.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(PathBuf::from),
        );
    }
    Ok(files)
}

/// The metadata of one of several files published under one key: the shared metadata
/// plus `file` = the file's base name. Refuses a shared `file` (every entry would then
/// name the same file).
pub fn metadata_for(shared: &Map<String, Value>, path: &Path) -> Result<Map<String, Value>> {
    if shared.contains_key("file") {
        bail!("file=… cannot be given with several files: each entry is named after its file");
    }
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        bail!("{}: no UTF-8 file name to publish it under", path.display());
    };
    let mut meta = shared.clone();
    meta.insert("file".into(), Value::String(name.to_string()));
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
    let files = collect_files(&args)?;
    if files.len() > 1 || args.files_from.is_some() {
        return run_many(args, client, files).await;
    }
    let path = match (files.first(), &args.url) {
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

/// Several files under one key (`-f` repeated or `--files-from`): each is hashed,
/// POSTed unless shacache has it, signed and PUT, `--jobs` at a time; one line
/// `SHA512  PATH` a file on standard output, in the order given. Stops at the first
/// failure (the entries already PUT stay published).
async fn run_many(args: UploadArgs, client: Client, files: Vec<PathBuf>) -> Result<()> {
    let Some(key) = args.key.clone() else {
        bail!("several files need --key (each file becomes one entry of that key)");
    };
    if files.is_empty() {
        bail!("no file to upload (the --files-from list is empty)");
    }
    let shared = collect_metadata(args.metadata.as_ref(), &args.meta)?;
    let jobs: Vec<(PathBuf, Map<String, Value>)> = files
        .into_iter()
        .map(|f| metadata_for(&shared, &f).map(|m| (f, m)))
        .collect::<Result<_>>()?;
    let client = Arc::new(client);
    let key: Arc<str> = key.into();
    let bar = count_bar("upload", jobs.len() as u64);
    let mut results = futures_util::stream::iter(jobs.into_iter().map(|(path, meta)| {
        let (client, key) = (client.clone(), key.clone());
        tokio::spawn(async move { publish_one(&client, &key, path, &meta).await })
    }))
    .buffered(usize::from(args.jobs));
    let mut out = std::io::stdout().lock();
    let mut count = 0usize;
    while let Some(done) = results.next().await {
        let (path, sha) = done.context("an upload task panicked")??;
        bar.inc(1);
        bar.suspend(|| writeln!(out, "{sha}  {}", path.display()))?;
        count += 1;
    }
    bar.finish_and_clear();
    out.flush()?;
    tracing::info!("published {count} entries under key {key}");
    Ok(())
}

/// One file of [`run_many`]: hash, blob, signed entry.
async fn publish_one(
    client: &Client,
    key: &str,
    path: PathBuf,
    meta: &Map<String, Value>,
) -> Result<(PathBuf, Sha512)> {
    let hash_path = path.clone();
    let (sha, _) = tokio::task::spawn_blocking(move || Sha512::of_file(&hash_path))
        .await?
        .with_context(|| format!("cannot read {}", path.display()))?;
    let tmp = std::env::temp_dir();
    client
        .ensure_blob(&path, &sha, &tmp, &|_, _| {})
        .await
        .with_context(|| format!("{}: cannot upload the blob", path.display()))?;
    let entry = client.make_entry(&sha, meta);
    client
        .store
        .put_dir(key, &entry)
        .await
        .with_context(|| format!("{}: cannot publish the entry", path.display()))?;
    Ok((path, sha))
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

    #[test]
    fn several_files_are_named_after_each_file() {
        let shared = collect_metadata(None, &["os=debian".into()]).unwrap();
        let m = metadata_for(&shared, Path::new("/tmp/out/a.bin")).unwrap();
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"os":"debian","file":"a.bin"}"#
        );
        let named = collect_metadata(None, &["file=x".into()]).unwrap();
        assert!(metadata_for(&named, Path::new("a.bin"))
            .unwrap_err()
            .to_string()
            .contains("cannot be given with several files"));
        assert!(metadata_for(&shared, Path::new("/")).is_err());
    }
}
