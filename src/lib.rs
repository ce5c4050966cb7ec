//! shacachefs: a SlapOS network cache (shacache + shadir) as a directory tree.
//!
//! Data flows one way: `cli/config → app → mount (FUSE adapter) → fs (core) → cache →
//! remote`. The embedded server shares only the wire types, the digest and the signature
//! code with the client side. See `ARCHITECTURE.md` for the module map.

// `RemoteError` carries two digests for a precise mismatch message; boxing it would
// only move the allocation to every error path.
#![allow(clippy::result_large_err)]

pub mod behind;
pub mod cache;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod digest;
pub mod filter;
pub mod fs;
pub mod growing;
pub mod metrics;
pub mod mount;
pub mod naming;
pub mod outbox;
pub mod publish;
pub mod pyjson;
pub mod remote;
pub mod server;
pub mod sha512;
pub mod signature;
pub mod store;
pub mod wire;
