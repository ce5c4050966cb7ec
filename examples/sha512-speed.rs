//! Measures one stream's SHA-512 throughput of the crate's implementation (for
//! `scripts/bench-hash`). Build: `cargo build --release --example sha512-speed`.
//!
//!   sha512-speed [--size MIB] [--runs N] [--impl NAME|sha2-crate-asm]
//!
//! Prints one line per run: `<MB/s> <implementation> <MB/s of CPU time>` (MB = 10^6
//! bytes), on a buffer of MIB MiB (default 256) of pseudo-random bytes in memory. `--impl` forces one dispatch
//! path (`libcrypto`, `avx2-bmi2`, `sha2-crate`); `sha2-asm` times the `sha2` crate's whole hasher as
//! the crate used it before (with its `asm` feature), for comparison.

use shacachefs::sha512::{Hasher, Impl};
use std::time::Instant;

fn main() {
    let mut size_mib: usize = 256;
    let mut runs = 1usize;
    let mut which: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--size" => size_mib = value().parse().unwrap_or_else(|_| usage("bad --size")),
            "--runs" => runs = value().parse().unwrap_or_else(|_| usage("bad --runs")),
            "--impl" => which = Some(value()),
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    let mut x = 0x9e3779b97f4a7c15u64;
    let data: Vec<u8> = (0..size_mib << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let imp = match which.as_deref() {
        None => Some(Impl::detect()),
        Some("sha2-asm") => None,
        Some(name) => Some(
            Impl::supported()
                .into_iter()
                .find(|i| i.name() == name)
                .unwrap_or_else(|| usage(&format!("{name}: not supported on this CPU"))),
        ),
    };
    for _ in 0..runs {
        let start = Instant::now();
        let cpu_start = thread_cpu_seconds();
        let first = match imp {
            Some(imp) => {
                let mut h = Hasher::with_impl(imp).expect("supported");
                h.update(&data);
                h.finalize()[0]
            }
            None => {
                use sha2::Digest;
                sha2::Sha512::digest(&data)[0]
            }
        };
        let secs = start.elapsed().as_secs_f64();
        let cpu_secs = thread_cpu_seconds() - cpu_start;
        std::hint::black_box(first);
        let name = imp.map_or("sha2-asm", Impl::name);
        let mb = data.len() as f64 / 1e6;
        println!("{:.1} {name} {:.1}", mb / secs, mb / cpu_secs);
    }
}

/// CPU time of this thread (it does not count time spent waiting for a core, which a
/// loaded machine adds to the elapsed time).
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn usage(msg: &str) -> ! {
    eprintln!("sha512-speed: {msg}\nusage: sha512-speed [--size MIB] [--runs N] [--impl NAME]");
    std::process::exit(2)
}
