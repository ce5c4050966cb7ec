//! Random test data from `rand`'s `StdRng`, seeded, so that a run is reproducible from
//! its seed: [`rng`] for choices, [`pseudo_random_bytes`] for data in memory and
//! [`write_random_file`] for large files written in 1 MiB chunks. For one seed the file
//! holds the same bytes as the buffer of the same length.

use rand::{RngCore, SeedableRng};
use std::io::Write;
use std::path::Path;

/// The generator of the tests (`gen_range`, `next_u64`, `fill_bytes` from `rand::Rng`).
pub type TestRng = rand::rngs::StdRng;

/// A generator seeded with `seed`.
pub fn rng(seed: u64) -> TestRng {
    TestRng::seed_from_u64(seed)
}

/// `len` bytes of reproducible pseudo-random data, different per `seed`.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    rng(seed).fill_bytes(&mut out);
    out
}

/// Writes `len` pseudo-random bytes (the same as [`pseudo_random_bytes`] with `seed`) to
/// `path` in 1 MiB chunks, so that large files never sit in memory.
pub fn write_random_file(path: &Path, len: u64, seed: u64) {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display())),
    );
    let mut rng = rng(seed);
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        rng.fill_bytes(&mut chunk[..n]);
        f.write_all(&chunk[..n]).expect("writing a random file");
        left -= n as u64;
    }
    f.flush().expect("writing a random file");
}
