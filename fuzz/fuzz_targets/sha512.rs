//! Fuzz target: SHA-512. For any input, fed in pieces whose sizes the first bytes choose,
//! every implementation this CPU supports (each forced in turn) gives the digest of the
//! `sha2` crate's own hasher over the rest of the input, and so does
//! `shacachefs::digest::Sha512::of`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sha2::Digest;
use shacachefs::sha512::{Hasher, Impl};

fuzz_target!(|data: &[u8]| {
    // Up to 8 leading bytes give the piece sizes (cycled); the rest is the message.
    let (sizes, message) = data.split_at(data.first().map_or(0, |&n| 1 + n as usize % 8).min(data.len()));
    let expected: [u8; 64] = sha2::Sha512::digest(message).into();
    assert_eq!(shacachefs::digest::Sha512::of(message).hex(), hex(&expected));
    for imp in Impl::supported() {
        let mut h = Hasher::with_impl(imp).expect("supported");
        let mut rest = message;
        let mut i = 0;
        while !rest.is_empty() {
            // Sizes spread over 0..=765 bytes: within a block, across one, several blocks.
            // A size 0 feeds an empty piece, then one byte (so that the loop ends).
            let mut n = sizes.get(i % sizes.len().max(1)).map_or(rest.len(), |&s| s as usize * 3);
            if n == 0 {
                h.update(&rest[..0]);
                n = 1;
            }
            let (piece, r) = rest.split_at(n.min(rest.len()));
            h.update(piece);
            rest = r;
            i += 1;
        }
        assert_eq!(h.finalize(), expected, "{imp:?}, {} bytes", message.len());
    }
});

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
