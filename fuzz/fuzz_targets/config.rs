//! Fuzz target: `Config::parse` on arbitrary text must return (a configuration or an
//! error), never panic. The text is taken as UTF-8 where it is (as `Config::load` does,
//! which refuses other bytes before parsing).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shacachefs::config::Config;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = Config::parse(text, Path::new("fuzz.cfg")) {
        // The certificates it found go to the verifier as they would at mount time.
        let _ = shacachefs::signature::Verifier::from_pems(&cfg.signature_certificates);
    }
});
