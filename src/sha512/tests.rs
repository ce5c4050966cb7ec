//! Each implementation the CPU supports, forced in turn, against the FIPS 180 examples
//! and differentially against the `sha2` crate's hasher.

use super::{digest, Hasher, Impl};
use sha2::Digest;

fn reference(data: &[u8]) -> [u8; 64] {
    sha2::Sha512::digest(data).into()
}

/// A small deterministic generator (xorshift64*), so that a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545f4914f6cdd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next() >> 32) as u8).collect()
    }
}

fn with(imp: Impl, chunks: &[&[u8]]) -> [u8; 64] {
    let mut h = Hasher::with_impl(imp).expect("a supported implementation");
    assert_eq!(h.implementation(), imp);
    for c in chunks {
        h.update(c);
    }
    h.finalize()
}

#[test]
fn fips_180_examples_on_every_supported_path() {
    let abc = "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f";
    let two_block = "8e959b75dae313da8cf4f72814fc143f8f7779c6eb9f7fa17299aeadb6889018501d289e4900f7e4331b99dec4b5433ac7d329eeb6dd26545e96e55b874be909";
    let million_a = "e718483d0ce769644e2e42c7bc15b4638e1f98b13b2044285632a803afa973ebde0ff244877ea60a4cb0432ce577c31beb009c5c2c49aa2e4eadb217ad8cc09b";
    let empty = "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e";
    let msg896 = b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu";
    assert_eq!(msg896.len() * 8, 896);
    let a = vec![b'a'; 1_000_000];
    let supported = Impl::supported();
    assert_eq!(supported.last(), Some(&Impl::Portable));
    for imp in supported {
        assert_eq!(hex::encode(with(imp, &[b"abc"])), abc, "{imp:?}");
        assert_eq!(hex::encode(with(imp, &[msg896])), two_block, "{imp:?}");
        assert_eq!(hex::encode(with(imp, &[&a])), million_a, "{imp:?}");
        assert_eq!(hex::encode(with(imp, &[])), empty, "{imp:?}");
        // One million 'a' fed in uneven pieces too.
        let pieces: Vec<&[u8]> = a.chunks(999).collect();
        assert_eq!(hex::encode(with(imp, &pieces)), million_a, "{imp:?}");
    }
}

#[test]
fn every_length_up_to_three_pairs_of_blocks_matches_sha2() {
    // Every padding case (0..=111 and 112..=127 bytes in the last block) and every
    // number of blocks up to six, pairs and a single block left, on each path.
    let data = Rng(7).bytes(800);
    for imp in Impl::supported() {
        for len in 0..=data.len() {
            assert_eq!(
                with(imp, &[&data[..len]]),
                reference(&data[..len]),
                "{imp:?} {len}"
            );
        }
    }
}

#[test]
fn random_lengths_splits_and_alignments_match_sha2() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let pool = rng.bytes(300_000 + 64);
    for round in 0..300 {
        let len = match round % 3 {
            0 => rng.below(2_000),
            1 => rng.below(40_000),
            _ => rng.below(300_000),
        };
        // An offset into the pool makes the input start at any alignment.
        let offset = rng.below(64);
        let data = &pool[offset..offset + len];
        let expected = reference(data);
        // Split into pieces of random sizes (some empty, some of several blocks).
        let mut chunks = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let n = match rng.below(4) {
                0 => rng.below(3),
                1 => rng.below(130),
                2 => rng.below(600),
                _ => rng.below(20_000),
            }
            .min(rest.len());
            let (c, r) = rest.split_at(n);
            chunks.push(c);
            rest = r;
        }
        for imp in Impl::supported() {
            assert_eq!(
                with(imp, &[data]),
                expected,
                "{imp:?} len {len} offset {offset}"
            );
            assert_eq!(with(imp, &chunks), expected, "{imp:?} len {len} in pieces");
        }
    }
}

#[test]
fn the_default_is_the_first_supported_path() {
    let supported = Impl::supported();
    assert_eq!(Impl::detect(), supported[0]);
    assert_eq!(Hasher::new().implementation(), supported[0]);
    assert_eq!(digest(b"abc"), reference(b"abc"));
    // The system's libcrypto first when it loads, else our AVX2 path where the CPU
    // has the features.
    if supported.contains(&Impl::Libcrypto) {
        assert_eq!(Impl::detect(), Impl::Libcrypto);
    } else {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("bmi1")
            && std::is_x86_feature_detected!("bmi2")
        {
            assert_eq!(Impl::detect(), Impl::Avx2Bmi2);
        }
    }
    // This machine has OpenSSL (the reference client's hashlib uses it): the libcrypto
    // path must load here, or the tests above would not exercise it.
    if std::path::Path::new("/usr/lib/x86_64-linux-gnu/libcrypto.so.3").exists() {
        assert!(
            supported.contains(&Impl::Libcrypto),
            "libcrypto.so.3 did not load"
        );
    }
    // A clone goes on independently from the same state.
    let mut h = Hasher::new();
    h.update(b"ab");
    let mut h2 = h.clone();
    h.update(b"c");
    h2.update(b"d");
    assert_eq!(h.finalize(), reference(b"abc"));
    assert_eq!(h2.finalize(), reference(b"abd"));
}
