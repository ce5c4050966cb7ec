//! Fuzz target: the trusted-certificate list. `Verifier::from_pems` must skip (with a
//! warning) whatever it cannot use and never panic, on
//! - PEM-ish text (first byte even): the rest split at NUL bytes into several "files",
//!   as a configuration's `signature-certificate-list` gives them;
//! - arbitrary DER (first byte odd) wrapped in base64 as a `BEGIN CERTIFICATE` block,
//!   which reaches the X.509 decoders (strict, then the lenient walk) directly.
//!
//! Every input that yields no certificate yields a warning; a verifier that comes out of
//! it must then verify an arbitrary signature without panicking.
#![no_main]

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use shacachefs::signature::Verifier;

fn wrap_der(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let pems: Vec<String> = if mode % 2 == 0 {
        String::from_utf8_lossy(rest)
            .split('\0')
            .map(str::to_string)
            .collect()
    } else {
        vec![wrap_der(rest)]
    };
    let (verifier, warnings) = Verifier::from_pems(&pems);
    if verifier.is_empty() {
        assert!(!warnings.is_empty(), "nothing usable and no warning");
        return;
    }
    // Any signature, well-formed base64 or not: a verdict, never a panic.
    let sig = base64::engine::general_purpose::STANDARD.encode(rest);
    let _ = verifier.verify("{\"sha512\": \"00\"}", &sig);
    let _ = verifier.verify("", &String::from_utf8_lossy(rest));
});
