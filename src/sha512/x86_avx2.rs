//! SHA-512 compression for x86-64 CPUs with AVX2, BMI1 and BMI2.
//!
//! Blocks are taken two at a time. The message schedule of both is computed together in
//! 256-bit registers (block A in the low 128-bit lane, block B in the high one: each lane
//! holds two consecutive schedule words), `W[t] + K[t]` is stored into a stack buffer,
//! and the 80 rounds of A then of B run in general-purpose registers, where BMI2's `rorx`
//! rotates without a copy and BMI1's `andn` saves one operation of `Ch`. The vector units
//! thus do the schedule beside the integer units that do the rounds; on a CPU without
//! AVX-512 the rounds' integer operations are what bounds the speed.
//!
//! Only [`compress`] is reachable from outside, and only after the caller checked the CPU
//! features (see `super::Impl::detect`).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::K;

/// `K` with each pair of constants repeated for the two lanes: `[K0, K1, K0, K1, K2, K3,
/// K2, K3, …]`, 32-byte aligned so that one aligned load gives a lane pair.
#[repr(C, align(32))]
struct PairedK([u64; 160]);

static K_PAIRED: PairedK = {
    let mut out = [0u64; 160];
    let mut i = 0;
    while i < 40 {
        out[4 * i] = K[2 * i];
        out[4 * i + 1] = K[2 * i + 1];
        out[4 * i + 2] = K[2 * i];
        out[4 * i + 3] = K[2 * i + 1];
        i += 1;
    }
    PairedK(out)
};

/// `W[t] + K[t]` of two blocks.
#[repr(C, align(32))]
struct Schedule([[u64; 80]; 2]);

/// Runs the compression function over `blocks` (a whole number of 128-byte blocks).
///
/// # Safety
/// The CPU must support AVX2, BMI1 and BMI2.
#[target_feature(enable = "avx2,bmi1,bmi2")]
pub(super) unsafe fn compress(state: &mut [u64; 8], blocks: &[u8]) {
    debug_assert_eq!(blocks.len() % 128, 0);
    // Two schedules: the rounds of one pair read one while the other is being filled for
    // the next pair.
    // Two schedules: the rounds of one pair read one while the other is being filled for
    // the next pair. Each has a fixed place (the loop is unrolled twice), so that both
    // are addressed from the stack pointer and leave the registers to the rounds.
    let mut wk0 = Schedule([[0; 80]; 2]);
    let mut wk1 = Schedule([[0; 80]; 2]);
    let mut pairs = blocks.chunks_exact(256);
    let rest = pairs.remainder();
    if let Some(first) = pairs.next() {
        schedule(&first[..128], &first[128..], &mut wk0);
        loop {
            // The last pair schedules itself again (wasted work, but the same code).
            let next = pairs.next();
            rounds_of_pair(state, &wk0, &mut wk1, next.unwrap_or(first));
            if next.is_none() {
                break;
            }
            let next = pairs.next();
            rounds_of_pair(state, &wk1, &mut wk0, next.unwrap_or(first));
            if next.is_none() {
                break;
            }
        }
    }
    if !rest.is_empty() {
        // One block left: schedule it in both lanes, round once.
        schedule(rest, rest, &mut wk0);
        rounds(state, &wk0.0[0]);
    }
}

/// Rotates each 64-bit lane right by `N` (`M` = 64 - `N`: AVX2 has no 64-bit rotate).
#[inline(always)]
unsafe fn ror<const N: i32, const M: i32>(x: __m256i) -> __m256i {
    _mm256_or_si256(_mm256_srli_epi64::<N>(x), _mm256_slli_epi64::<M>(x))
}

/// σ0(x) = (x ⋙ 1) ⊕ (x ⋙ 8) ⊕ (x ≫ 7), per lane.
#[inline(always)]
unsafe fn small_sigma0(x: __m256i) -> __m256i {
    _mm256_xor_si256(
        _mm256_xor_si256(ror::<1, 63>(x), ror::<8, 56>(x)),
        _mm256_srli_epi64::<7>(x),
    )
}

/// σ1(x) = (x ⋙ 19) ⊕ (x ⋙ 61) ⊕ (x ≫ 6), per lane.
#[inline(always)]
unsafe fn small_sigma1(x: __m256i) -> __m256i {
    _mm256_xor_si256(
        _mm256_xor_si256(ror::<19, 45>(x), ror::<61, 3>(x)),
        _mm256_srli_epi64::<6>(x),
    )
}

/// Fills `wk` with `W[t] + K[t]` for block `a` (`wk.0[0]`) and block `b` (`wk.0[1]`).
#[inline(always)]
unsafe fn schedule(a: &[u8], b: &[u8], wk: &mut Schedule) {
    assert!(a.len() >= 128 && b.len() >= 128);
    // Reverses the bytes of each 64-bit word (the message is big-endian).
    let bswap = _mm256_set_epi64x(
        0x08090a0b0c0d0e0f,
        0x0001020304050607,
        0x08090a0b0c0d0e0f,
        0x0001020304050607,
    );
    let kp = K_PAIRED.0.as_ptr() as *const __m256i;
    let out_a = wk.0[0].as_mut_ptr() as *mut __m128i;
    let out_b = wk.0[1].as_mut_ptr() as *mut __m128i;
    // x[j] holds words (2j, 2j+1) of the sixteen last, A low, B high.
    let mut x = [_mm256_setzero_si256(); 8];
    for (j, xj) in x.iter_mut().enumerate() {
        // SAFETY: 16 * j + 16 <= 128 bytes of each block, checked above; unaligned
        // loads. The stores stay within the 80 words of each half of `wk`, and the
        // constant loads within the 160 words of `K_PAIRED` (aligned to 32).
        let lo = _mm_loadu_si128(a.as_ptr().add(16 * j) as *const __m128i);
        let hi = _mm_loadu_si128(b.as_ptr().add(16 * j) as *const __m128i);
        let w = _mm256_shuffle_epi8(_mm256_set_m128i(hi, lo), bswap);
        *xj = w;
        let s = _mm256_add_epi64(w, _mm256_load_si256(kp.add(j)));
        _mm_store_si128(out_a.add(j), _mm256_castsi256_si128(s));
        _mm_store_si128(out_b.add(j), _mm256_extracti128_si256::<1>(s));
    }
    // Words 16..80, two at a time, in four passes over the ring of eight registers.
    macro_rules! step {
        ($pass:expr, $j:literal) => {{
            // New pair p = 8 * pass + 8 + j replaces x[j] (= pair p - 8: W[t-16], W[t-15]).
            let w16 = x[$j];
            let w15 = _mm256_alignr_epi8::<8>(x[($j + 1) % 8], x[$j]);
            let w7 = _mm256_alignr_epi8::<8>(x[($j + 5) % 8], x[($j + 4) % 8]);
            let w2 = x[($j + 7) % 8];
            let w = _mm256_add_epi64(
                _mm256_add_epi64(w16, small_sigma0(w15)),
                _mm256_add_epi64(w7, small_sigma1(w2)),
            );
            x[$j] = w;
            let p = 8 * $pass + 8 + $j;
            // SAFETY: p < 40, so the pair is within both halves of `wk` and `K_PAIRED`.
            let s = _mm256_add_epi64(w, _mm256_load_si256(kp.add(p)));
            _mm_store_si128(out_a.add(p), _mm256_castsi256_si128(s));
            _mm_store_si128(out_b.add(p), _mm256_extracti128_si256::<1>(s));
        }};
    }
    for pass in 0..4 {
        step!(pass, 0);
        step!(pass, 1);
        step!(pass, 2);
        step!(pass, 3);
        step!(pass, 4);
        step!(pass, 5);
        step!(pass, 6);
        step!(pass, 7);
    }
}

/// The 80 rounds of one block, given its `W[t] + K[t]`, added into `state`.
#[inline(always)]
unsafe fn rounds(state: &mut [u64; 8], wk: &[u64; 80]) {
    let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
    // Maj(a, b, c) = ((a ⊕ b) ∧ (b ⊕ c)) ⊕ b; this round's a ⊕ b is the next one's b ⊕ c.
    let mut bc = b ^ c;
    macro_rules! round {
        ($a:ident, $b:ident, $c:ident, $d:ident, $e:ident, $f:ident, $g:ident, $h:ident, $t:expr) => {{
            let s1 = $e.rotate_right(14) ^ $e.rotate_right(18) ^ $e.rotate_right(41);
            // Ch(e, f, g): the two terms have no bit in common, so + is ⊕ here, and the
            // additions can be reordered freely.
            let ch = ($e & $f).wrapping_add(!$e & $g);
            let t1 = $h.wrapping_add(wk[$t]).wrapping_add(ch).wrapping_add(s1);
            $d = $d.wrapping_add(t1);
            let s0 = $a.rotate_right(28) ^ $a.rotate_right(34) ^ $a.rotate_right(39);
            let ab = $a ^ $b;
            let maj = (ab & bc) ^ $b;
            bc = ab;
            $h = t1.wrapping_add(s0).wrapping_add(maj);
        }};
    }
    let mut t = 0;
    while t < 80 {
        round!(a, b, c, d, e, f, g, h, t);
        round!(h, a, b, c, d, e, f, g, t + 1);
        round!(g, h, a, b, c, d, e, f, t + 2);
        round!(f, g, h, a, b, c, d, e, t + 3);
        round!(e, f, g, h, a, b, c, d, t + 4);
        round!(d, e, f, g, h, a, b, c, t + 5);
        round!(c, d, e, f, g, h, a, b, t + 6);
        round!(b, c, d, e, f, g, h, a, t + 7);
        t += 8;
    }
    for (s, v) in state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
        *s = s.wrapping_add(v);
    }
}

/// The 160 rounds of a pair of blocks (A then B) whose `W + K` are in `now`, while the
/// schedule of the next pair (`na`, `nb`) is computed into `then`: two schedule steps
/// after every eight rounds, so that the vector units work beside the integer ones.
#[inline(always)]
unsafe fn rounds_of_pair(state: &mut [u64; 8], now: &Schedule, then: &mut Schedule, next: &[u8]) {
    assert!(next.len() >= 256);
    let (na, nb) = next.split_at(128);
    let bswap = _mm256_set_epi64x(
        0x08090a0b0c0d0e0f,
        0x0001020304050607,
        0x08090a0b0c0d0e0f,
        0x0001020304050607,
    );
    let kp = K_PAIRED.0.as_ptr() as *const __m256i;
    let out_a = then.0[0].as_mut_ptr() as *mut __m128i;
    let out_b = then.0[1].as_mut_ptr() as *mut __m128i;
    // The 160 words of `now`, A's then B's (the two arrays are contiguous).
    let wk = now.0.as_ptr() as *const u64;
    let mut x = [_mm256_setzero_si256(); 8];
    let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
    let mut bc = b ^ c;

    macro_rules! round {
        ($a:ident, $b:ident, $c:ident, $d:ident, $e:ident, $f:ident, $g:ident, $h:ident, $w:expr) => {{
            let s1 = $e.rotate_right(14) ^ $e.rotate_right(18) ^ $e.rotate_right(41);
            let ch = ($e & $f).wrapping_add(!$e & $g);
            let t1 = $h.wrapping_add($w).wrapping_add(ch).wrapping_add(s1);
            $d = $d.wrapping_add(t1);
            let s0 = $a.rotate_right(28) ^ $a.rotate_right(34) ^ $a.rotate_right(39);
            let ab = $a ^ $b;
            let maj = (ab & bc) ^ $b;
            bc = ab;
            $h = t1.wrapping_add(s0).wrapping_add(maj);
        }};
    }
    // Rounds r..r+8 (r a multiple of 8 below 160); the names come back to their places.
    macro_rules! eight {
        ($r:expr) => {{
            // SAFETY: r + 7 < 160 words of `now`.
            let w = wk.add($r);
            round!(a, b, c, d, e, f, g, h, *w);
            round!(h, a, b, c, d, e, f, g, *w.add(1));
            round!(g, h, a, b, c, d, e, f, *w.add(2));
            round!(f, g, h, a, b, c, d, e, *w.add(3));
            round!(e, f, g, h, a, b, c, d, *w.add(4));
            round!(d, e, f, g, h, a, b, c, *w.add(5));
            round!(c, d, e, f, g, h, a, b, *w.add(6));
            round!(b, c, d, e, f, g, h, a, *w.add(7));
        }};
    }
    // Adds the working variables into the state (a block done).
    macro_rules! fold {
        () => {{
            for (s, v) in state.iter_mut().zip([a, b, c, d, e, f, g, h]) {
                *s = s.wrapping_add(v);
            }
        }};
    }
    macro_rules! store {
        ($p:expr, $w:expr) => {{
            // SAFETY: $p < 40 pairs: within both halves of `then` and `K_PAIRED`.
            let s = _mm256_add_epi64($w, _mm256_load_si256(kp.add($p)));
            _mm_store_si128(out_a.add($p), _mm256_castsi256_si128(s));
            _mm_store_si128(out_b.add($p), _mm256_extracti128_si256::<1>(s));
        }};
    }
    macro_rules! load {
        ($j:literal) => {{
            // SAFETY: 16 * j + 16 <= 128 bytes of each block (checked above).
            let lo = _mm_loadu_si128(na.as_ptr().add(16 * $j) as *const __m128i);
            let hi = _mm_loadu_si128(nb.as_ptr().add(16 * $j) as *const __m128i);
            x[$j] = _mm256_shuffle_epi8(_mm256_set_m128i(hi, lo), bswap);
            store!($j, x[$j]);
        }};
    }
    macro_rules! step {
        ($pass:expr, $j:literal) => {{
            let w15 = _mm256_alignr_epi8::<8>(x[($j + 1) % 8], x[$j]);
            let w7 = _mm256_alignr_epi8::<8>(x[($j + 5) % 8], x[($j + 4) % 8]);
            x[$j] = _mm256_add_epi64(
                _mm256_add_epi64(x[$j], small_sigma0(w15)),
                _mm256_add_epi64(w7, small_sigma1(x[($j + 7) % 8])),
            );
            store!(8 * $pass + 8 + $j, x[$j]);
        }};
    }

    // Rounds 0..32 of A beside the eight loads of the next pair.
    eight!(0);
    load!(0);
    load!(1);
    eight!(8);
    load!(2);
    load!(3);
    eight!(16);
    load!(4);
    load!(5);
    eight!(24);
    load!(6);
    load!(7);
    // Rounds 32..160 beside the four passes of the schedule; A ends at round 80.
    for pass in 0..4 {
        let r = 32 + 32 * pass;
        eight!(r);
        step!(pass, 0);
        step!(pass, 1);
        eight!(r + 8);
        if pass == 1 {
            fold!();
            [a, b, c, d, e, f, g, h] = *state;
            bc = b ^ c;
        }
        step!(pass, 2);
        step!(pass, 3);
        eight!(r + 16);
        step!(pass, 4);
        step!(pass, 5);
        eight!(r + 24);
        step!(pass, 6);
        step!(pass, 7);
    }
    fold!();
}
