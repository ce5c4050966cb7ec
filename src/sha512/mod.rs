//! SHA-512 (FIPS 180-4) with the compression function chosen at run time for the CPU.
//!
//! Every blob digest of the crate goes through here (by way of `crate::digest`): one
//! stream's SHA-512 is what bounds a cold read or an upload, and the reference client
//! hashes with OpenSSL, so the speed of this function is the speed of the filesystem.
//!
//! - [`Impl::Libcrypto`] (when the system's OpenSSL libcrypto can be loaded, see
//!   `libcrypto.rs`): OpenSSL's own SHA-512, the reference client's, so a cold read or
//!   an upload hashes exactly as fast as `networkcache-download` does. Nothing is linked
//!   at build time; `SHACACHEFS_NO_LIBCRYPTO=1` turns it off.
//! - [`Impl::Avx2Bmi2`] (x86-64 with AVX2, BMI1 and BMI2, checked at run time): our own
//!   code in `x86_avx2.rs`, message schedule of two blocks at once in vector registers,
//!   rounds with `rorx`/`andn`. About as fast as OpenSSL's own AVX2 code.
//! - [`Impl::Portable`] (every other CPU): the `sha2` crate's compression function.
//!
//! No AVX-512 path: the development machines expose no AVX-512, so such code could not be
//! tested here; a CPU with it takes the AVX2 path. The binary is built for the baseline
//! target (no `target-cpu`); the choice is made once per hasher, from `std`'s cached CPU
//! feature detection.

mod libcrypto;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;

#[cfg(test)]
mod tests;

/// The round constants (FIPS 180-4, 4.2.3).
#[rustfmt::skip]
const K: [u64; 80] = [
    0x428a2f98d728ae22, 0x7137449123ef65cd, 0xb5c0fbcfec4d3b2f, 0xe9b5dba58189dbbc,
    0x3956c25bf348b538, 0x59f111f1b605d019, 0x923f82a4af194f9b, 0xab1c5ed5da6d8118,
    0xd807aa98a3030242, 0x12835b0145706fbe, 0x243185be4ee4b28c, 0x550c7dc3d5ffb4e2,
    0x72be5d74f27b896f, 0x80deb1fe3b1696b1, 0x9bdc06a725c71235, 0xc19bf174cf692694,
    0xe49b69c19ef14ad2, 0xefbe4786384f25e3, 0x0fc19dc68b8cd5b5, 0x240ca1cc77ac9c65,
    0x2de92c6f592b0275, 0x4a7484aa6ea6e483, 0x5cb0a9dcbd41fbd4, 0x76f988da831153b5,
    0x983e5152ee66dfab, 0xa831c66d2db43210, 0xb00327c898fb213f, 0xbf597fc7beef0ee4,
    0xc6e00bf33da88fc2, 0xd5a79147930aa725, 0x06ca6351e003826f, 0x142929670a0e6e70,
    0x27b70a8546d22ffc, 0x2e1b21385c26c926, 0x4d2c6dfc5ac42aed, 0x53380d139d95b3df,
    0x650a73548baf63de, 0x766a0abb3c77b2a8, 0x81c2c92e47edaee6, 0x92722c851482353b,
    0xa2bfe8a14cf10364, 0xa81a664bbc423001, 0xc24b8b70d0f89791, 0xc76c51a30654be30,
    0xd192e819d6ef5218, 0xd69906245565a910, 0xf40e35855771202a, 0x106aa07032bbd1b8,
    0x19a4c116b8d2d0c8, 0x1e376c085141ab53, 0x2748774cdf8eeb99, 0x34b0bcb5e19b48a8,
    0x391c0cb3c5c95a63, 0x4ed8aa4ae3418acb, 0x5b9cca4f7763e373, 0x682e6ff3d6b2b8a3,
    0x748f82ee5defb2fc, 0x78a5636f43172f60, 0x84c87814a1f0ab72, 0x8cc702081a6439ec,
    0x90befffa23631e28, 0xa4506cebde82bde9, 0xbef9a3f7b2c67915, 0xc67178f2e372532b,
    0xca273eceea26619c, 0xd186b8c721c0c207, 0xeada7dd6cde0eb1e, 0xf57d4f7fee6ed178,
    0x06f067aa72176fba, 0x0a637dc5a2c898a6, 0x113f9804bef90dae, 0x1b710b35131c471b,
    0x28db77f523047d84, 0x32caab7b40c72493, 0x3c9ebe0a15c9bebc, 0x431d67c49c100d4c,
    0x4cc5d4becb3e42b6, 0x597f299cfc657e2a, 0x5fcb6fab3ad6faec, 0x6c44198c4a475817,
];

/// The initial hash value (FIPS 180-4, 5.3.5).
#[rustfmt::skip]
const H0: [u64; 8] = [
    0x6a09e667f3bcc908, 0xbb67ae8584caa73b, 0x3c6ef372fe94f82b, 0xa54ff53a5f1d36f1,
    0x510e527fade682d1, 0x9b05688c2b3e6c1f, 0x1f83d9abfb41bd6b, 0x5be0cd19137e2179,
];

/// Which compression function a hasher uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    /// The system's OpenSSL libcrypto, loaded at run time (`libcrypto.rs`).
    Libcrypto,
    /// x86-64 with AVX2, BMI1 and BMI2 (`x86_avx2.rs`).
    Avx2Bmi2,
    /// The `sha2` crate's compression function: any CPU.
    Portable,
}

impl Impl {
    /// The fastest implementation this CPU supports.
    pub fn detect() -> Impl {
        Impl::supported()[0]
    }

    /// Every implementation this CPU supports, fastest first (always ends with
    /// `Portable`). Tests force each of them.
    pub fn supported() -> Vec<Impl> {
        let mut out = Vec::new();
        if libcrypto::available() {
            out.push(Impl::Libcrypto);
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("bmi1")
            && std::is_x86_feature_detected!("bmi2")
        {
            out.push(Impl::Avx2Bmi2);
        }
        out.push(Impl::Portable);
        out
    }

    /// A short name for benchmarks and logs.
    pub fn name(self) -> &'static str {
        match self {
            Impl::Libcrypto => "libcrypto",
            Impl::Avx2Bmi2 => "avx2-bmi2",
            Impl::Portable => "sha2-crate",
        }
    }

    /// Runs the compression function over whole 128-byte blocks.
    fn compress(self, state: &mut [u64; 8], blocks: &[u8]) {
        debug_assert_eq!(blocks.len() % 128, 0);
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a hasher holds `Avx2Bmi2` only if `Impl::supported` (or
            // `Hasher::with_impl`, which checks against it) saw these CPU features.
            Impl::Avx2Bmi2 => unsafe { x86_avx2::compress(state, blocks) },
            #[cfg(not(target_arch = "x86_64"))]
            Impl::Avx2Bmi2 => unreachable!("never supported off x86-64"),
            Impl::Libcrypto => unreachable!("libcrypto hashes whole streams, not blocks"),
            Impl::Portable => {
                use sha2::digest::generic_array::GenericArray;
                for block in blocks.chunks_exact(128) {
                    sha2::compress512(state, std::slice::from_ref(GenericArray::from_slice(block)));
                }
            }
        }
    }
}

/// An incremental SHA-512 computation.
#[derive(Clone)]
pub struct Hasher {
    state: [u64; 8],
    /// The bytes of an incomplete block.
    buf: [u8; 128],
    buf_len: usize,
    /// Bytes fed so far (the message length, in bytes, of the padding).
    total: u128,
    imp: Impl,
    /// OpenSSL's own state, for [`Impl::Libcrypto`] (which keeps the whole stream's
    /// state itself, not ours).
    ossl: Option<Box<libcrypto::Ctx>>,
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher::new()
    }
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sha512::Hasher({}, {} bytes)",
            self.imp.name(),
            self.total
        )
    }
}

impl Hasher {
    /// A hasher with the fastest implementation for this CPU.
    pub fn new() -> Self {
        Self::with_impl(Impl::detect()).expect("the detected implementation is supported")
    }

    /// A hasher with a given implementation, or `None` if this CPU lacks it (tests and
    /// benchmarks use it to compare the implementations).
    pub fn with_impl(imp: Impl) -> Option<Self> {
        Impl::supported().contains(&imp).then_some(Hasher {
            state: H0,
            buf: [0; 128],
            buf_len: 0,
            total: 0,
            imp,
            ossl: (imp == Impl::Libcrypto).then(|| Box::new(libcrypto::Ctx::new())),
        })
    }

    /// The implementation in use.
    pub fn implementation(&self) -> Impl {
        self.imp
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, data: impl AsRef<[u8]>) {
        self.update_slice(data.as_ref())
    }

    fn update_slice(&mut self, mut data: &[u8]) {
        self.total += data.len() as u128;
        if let Some(ctx) = self.ossl.as_mut() {
            return ctx.update(data);
        }
        if self.buf_len > 0 {
            let take = (128 - self.buf_len).min(data.len());
            self.buf[self.buf_len..self.buf_len + take].copy_from_slice(&data[..take]);
            self.buf_len += take;
            data = &data[take..];
            if self.buf_len < 128 {
                return;
            }
            self.imp.compress(&mut self.state, &self.buf);
            self.buf_len = 0;
        }
        let whole = data.len() - data.len() % 128;
        if whole > 0 {
            self.imp.compress(&mut self.state, &data[..whole]);
        }
        let rest = &data[whole..];
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buf_len = rest.len();
    }

    /// The digest of everything fed.
    pub fn finalize(mut self) -> [u8; 64] {
        if let Some(ctx) = self.ossl.take() {
            return ctx.finish();
        }
        let bits = self.total.wrapping_mul(8);
        // Padding: 0x80, zeros, and the length in bits as a 128-bit big-endian number,
        // in one block or two.
        let mut tail = [0u8; 256];
        tail[..self.buf_len].copy_from_slice(&self.buf[..self.buf_len]);
        tail[self.buf_len] = 0x80;
        let end = if self.buf_len < 112 { 128 } else { 256 };
        tail[end - 16..end].copy_from_slice(&bits.to_be_bytes());
        self.imp.compress(&mut self.state, &tail[..end]);
        let mut out = [0u8; 64];
        for (o, s) in out.chunks_exact_mut(8).zip(self.state) {
            o.copy_from_slice(&s.to_be_bytes());
        }
        out
    }
}

/// The digest of a byte slice, with the fastest implementation for this CPU.
pub fn digest(data: &[u8]) -> [u8; 64] {
    let mut h = Hasher::new();
    h.update(data);
    h.finalize()
}
