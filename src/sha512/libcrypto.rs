//! The system's OpenSSL libcrypto, loaded at run time when it is there: its SHA-512 is
//! the reference client's, hand-tuned assembly for each CPU generation. Nothing is
//! linked at build time (the README's set-up needs no C toolchain and no OpenSSL
//! headers, and the binary runs where libcrypto is absent, on our own code); only the
//! three long-stable `SHA512_Init`/`SHA512_Update`/`SHA512_Final` symbols are used,
//! present in OpenSSL 1.1 and 3.x. TLS never uses this (rustls does).

use std::ffi::{c_int, c_void, CStr};
use std::sync::OnceLock;

/// Room for OpenSSL's `SHA512_CTX` (216 bytes on 64-bit targets): plain data, copied to
/// clone a computation.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
pub(super) struct Ctx([u8; 256]);

type Init = unsafe extern "C" fn(*mut c_void) -> c_int;
type Update = unsafe extern "C" fn(*mut c_void, *const c_void, usize) -> c_int;
type Final = unsafe extern "C" fn(*mut u8, *mut c_void) -> c_int;

struct Lib {
    init: Init,
    update: Update,
    finish: Final,
}

/// The library names tried, newest first.
const NAMES: [&CStr; 3] = [c"libcrypto.so.3", c"libcrypto.so.1.1", c"libcrypto.so"];

fn lib() -> Option<&'static Lib> {
    static LIB: OnceLock<Option<Lib>> = OnceLock::new();
    LIB.get_or_init(load).as_ref()
}

fn load() -> Option<Lib> {
    if std::env::var_os("SHACACHEFS_NO_LIBCRYPTO").is_some() {
        return None;
    }
    for name in NAMES {
        // SAFETY: dlopen/dlsym with NUL-terminated names; the handle is never closed,
        // so the function pointers stay valid for the life of the process.
        unsafe {
            let h = libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            if h.is_null() {
                continue;
            }
            let sym = |s: &CStr| libc::dlsym(h, s.as_ptr());
            let (i, u, f) = (
                sym(c"SHA512_Init"),
                sym(c"SHA512_Update"),
                sym(c"SHA512_Final"),
            );
            if i.is_null() || u.is_null() || f.is_null() {
                continue;
            }
            return Some(Lib {
                init: std::mem::transmute::<*mut c_void, Init>(i),
                update: std::mem::transmute::<*mut c_void, Update>(u),
                finish: std::mem::transmute::<*mut c_void, Final>(f),
            });
        }
    }
    None
}

/// True when libcrypto was found.
pub(super) fn available() -> bool {
    lib().is_some()
}

impl Ctx {
    /// A new computation (`available()` must be true).
    pub(super) fn new() -> Ctx {
        let mut c = Ctx([0; 256]);
        let lib = lib().expect("libcrypto loaded");
        // SAFETY: the buffer is larger than and as aligned as SHA512_CTX.
        unsafe { (lib.init)(c.0.as_mut_ptr().cast()) };
        c
    }

    pub(super) fn update(&mut self, data: &[u8]) {
        let lib = lib().expect("libcrypto loaded");
        // SAFETY: a context made by `new`; `data` is valid for its length.
        unsafe { (lib.update)(self.0.as_mut_ptr().cast(), data.as_ptr().cast(), data.len()) };
    }

    pub(super) fn finish(mut self) -> [u8; 64] {
        let lib = lib().expect("libcrypto loaded");
        let mut out = [0u8; 64];
        // SAFETY: a context made by `new`; `out` holds the 64-byte digest.
        unsafe { (lib.finish)(out.as_mut_ptr(), self.0.as_mut_ptr().cast()) };
        out
    }
}
