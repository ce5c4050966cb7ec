//! Fuzz target: a shadir `GET` body through the whole listing path of the client:
//! `wire::parse_listing` → `client::select_trusted` (with the fixture certificates, and
//! with no certificate at all) → `naming::name_entries` → `client::entries_json`.
//!
//! Invariants checked (a violation panics, which libFuzzer reports as a crash):
//! - every entry is either trusted or hidden (none lost, none made up);
//! - what the fixture certificates trust is also shown when nothing is configured;
//! - every file name is non-empty, at most 255 bytes, without `/` or NUL, not `.`, `..`
//!   or a reserved name of a key directory, and names are unique;
//! - `latest` names one of the files;
//! - names do not depend on the server's order (the reversed listing names the same
//!   blobs the same way).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shacachefs::client::{entries_json, select_trusted, TrustedEntry};
use shacachefs::naming::{name_entries, KEY_RESERVED, NAME_MAX};
use shacachefs::signature::Verifier;
use shacachefs::wire::parse_listing;
use std::collections::HashSet;
use std::sync::OnceLock;

/// The two fixture signers (RSA-1024 and RSA-2048), parsed once per process.
fn fixture_verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let pems = [
            include_str!("../../tests/fixtures/signature/signer-a.crt").to_string(),
            include_str!("../../tests/fixtures/signature/signer-b.crt").to_string(),
        ];
        let (v, warnings) = Verifier::from_pems(&pems);
        assert_eq!(v.certs.len(), 2, "fixture certificates: {warnings:?}");
        v
    })
}

/// Names `trusted` and checks the naming invariants; returns name → blob.
fn check_names(trusted: Vec<TrustedEntry>) -> Vec<(String, String)> {
    let named = name_entries(trusted);
    let mut seen = HashSet::new();
    for (name, _) in &named.files {
        assert!(!name.is_empty(), "empty file name");
        assert!(name.len() <= NAME_MAX, "name over 255 bytes: {name:?}");
        assert!(!name.contains('/'), "name with '/': {name:?}");
        assert!(!name.contains('\0'), "name with NUL: {name:?}");
        assert!(name != "." && name != "..", "dot name: {name:?}");
        assert!(
            !KEY_RESERVED.contains(&name.as_str()),
            "reserved name: {name:?}"
        );
        assert!(seen.insert(name.clone()), "duplicate name: {name:?}");
    }
    if let Some(latest) = &named.latest {
        assert!(seen.contains(latest), "latest -> {latest:?}, not a file");
    }
    // Must not panic either (it is what `.entries.json` shows).
    let _ = entries_json(&named.files);
    named
        .files
        .into_iter()
        .map(|(n, e)| (n, e.info.sha512.hex()))
        .collect()
}

fuzz_target!(|body: &[u8]| {
    let Ok(listing) = parse_listing(body) else {
        return;
    };
    let total = listing.entries.len() + listing.rejected.len();

    let (signed, hidden) = select_trusted(listing.clone(), fixture_verifier());
    assert_eq!(
        signed.len() + hidden.len(),
        total,
        "entries lost or made up"
    );
    for e in &signed {
        assert!(
            e.signer.label().starts_with("shacachefs-fixture-"),
            "trusted by an unknown signer: {:?}",
            e.signer
        );
    }
    let (all, hidden_all) = select_trusted(listing.clone(), &Verifier::default());
    assert_eq!(
        all.len() + hidden_all.len(),
        total,
        "entries lost or made up"
    );
    assert!(
        signed.len() <= all.len(),
        "the fixture certificates show more than the unverified view"
    );

    check_names(signed);
    let mut reversed = all.clone();
    reversed.reverse();
    let forward = check_names(all);
    let backward = check_names(reversed);
    assert_eq!(forward, backward, "names depend on the server's order");
});
