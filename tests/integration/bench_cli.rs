//! `shacachefs upload` with several files (`-f` repeated, `--files-from`): what
//! `scripts/bench` loads its big key with, through the product's own signing. Each file
//! becomes one signed entry named after the file, and `shacachefs ls` trusts them all.

use crate::support::{run, shacachefs, tempdir, Server};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn sha512_hex(data: &[u8]) -> String {
    shacachefs::digest::Sha512::of(data).hex()
}

/// `shacachefs ls --json KEY` as name → sha512.
fn listed(cfg: &Path, key: &str) -> BTreeMap<String, String> {
    let out = run(shacachefs([
        "ls",
        "-c",
        cfg.to_str().unwrap(),
        "--json",
        key,
    ]));
    out.assert_success();
    let doc: Value = serde_json::from_slice(&out.stdout).expect("ls --json prints JSON");
    doc.as_array()
        .expect("an array")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["sha512"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// `n` small distinct files in `dir`, as (path, content).
fn small_files(dir: &Path, prefix: &str, n: usize) -> Vec<(PathBuf, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let path = dir.join(format!("{prefix}{i:03}.txt"));
            let data = format!("{prefix} file number {i}\n").into_bytes();
            std::fs::write(&path, &data).unwrap();
            (path, data)
        })
        .collect()
}

#[test]
fn files_from_publishes_one_signed_entry_per_file() {
    let server = Server::start();
    let dir = tempdir();
    let cfg = server.config().signer_a().write(dir.path(), "n.cfg");
    let files = small_files(dir.path(), "e", 40);
    let list = dir.path().join("list");
    let mut text = String::new();
    for (path, _) in &files {
        text.push_str(&format!("{}\n\n", path.display())); // blank lines are skipped
    }
    std::fs::write(&list, text).unwrap();
    let out = run(shacachefs([
        "upload",
        "-c",
        cfg.to_str().unwrap(),
        "-k",
        "many",
        "-j",
        "4",
        "--files-from",
        list.to_str().unwrap(),
        "os=debian",
    ]));
    out.assert_success();
    // One `SHA512  PATH` line a file, in the order given.
    let lines: Vec<String> = out.stdout_text().lines().map(str::to_string).collect();
    let expected: Vec<String> = files
        .iter()
        .map(|(p, d)| format!("{}  {}", sha512_hex(d), p.display()))
        .collect();
    assert_eq!(lines, expected);
    // Every entry verifies with the configured certificate and is named after its file.
    let got = listed(&cfg, "many");
    let want: BTreeMap<String, String> = files
        .iter()
        .map(|(p, d)| {
            (
                p.file_name().unwrap().to_str().unwrap().to_string(),
                sha512_hex(d),
            )
        })
        .collect();
    assert_eq!(got, want);
}

#[test]
fn repeated_file_flags_and_the_refusals() {
    let server = Server::start();
    let dir = tempdir();
    let cfg = server.config().signer_a().write(dir.path(), "n.cfg");
    let files = small_files(dir.path(), "r", 2);
    let (a, b) = (files[0].0.to_str().unwrap(), files[1].0.to_str().unwrap());
    let c = cfg.to_str().unwrap();
    run(shacachefs([
        "upload", "-c", c, "-k", "two", "-f", a, "-f", b,
    ]))
    .assert_success();
    assert_eq!(
        listed(&cfg, "two").keys().cloned().collect::<Vec<_>>(),
        ["r000.txt", "r001.txt"]
    );
    // A shared file=… would name every entry the same: refused before any upload.
    let named = run(shacachefs([
        "upload", "-c", c, "-k", "named", "-f", a, "-f", b, "file=x",
    ]));
    named.assert_failure();
    assert!(named
        .stderr_text()
        .contains("cannot be given with several files"));
    // Several files without a key have nowhere to be published.
    let keyless = run(shacachefs(["upload", "-c", c, "-f", a, "-f", b]));
    keyless.assert_failure();
    assert!(keyless.stderr_text().contains("need --key"));
    // Nothing was published by the refused commands.
    let out = run(shacachefs(["ls", "-c", c, "--json", "named"]));
    assert!(
        !out.stdout_text().contains("r000.txt"),
        "{}",
        out.describe()
    );
}
