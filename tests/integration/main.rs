//! The integration tests, one binary (cargo builds and links it once): one module per
//! area, the shared scaffolding in [`support`]. Run one area with
//! `cargo test --release --test integration AREA::` (e.g. `mount::`, `server::`).

mod support;

mod bench_cli;
mod cache_pressure;
mod core;
mod crash;
mod faults;
mod hostile_server;
mod integrity;
mod interop;
mod mount;
mod nginx_cdn;
mod ops;
mod pin;
mod progress;
mod remote;
mod server;
mod server_limits;
mod soak;
mod tls_client;
mod trust;
mod write;
