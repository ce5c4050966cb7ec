//! The subcommands other than `mount`: each file holds one, taking its plain argument
//! struct from `cli`. Errors are `anyhow` here (and only here and in `main`).

pub mod download;
pub mod fsck;
pub mod keygen;
pub mod ls;
pub mod mount;
pub mod outbox;
pub mod prefetch;
pub mod serve;
pub mod status;
pub mod upload;

use crate::client::Client;
use crate::config::Config;
use crate::remote::Limits;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::Path;

/// One line for the user: the error and each cause its message does not already include
/// (messages that embed their cause would otherwise print it twice).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !line.contains(&c) {
            line.push_str(": ");
            line.push_str(&c);
        }
    }
    line
}

/// The configuration named by `-c`, else the first default file that exists.
pub fn load_config(path: Option<&Path>) -> Result<Config> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => match Config::find_default() {
            Some(p) => p,
            None => bail!(
                "no configuration: pass -c FILE (none of {} exists)",
                crate::config::DEFAULT_PATHS.join(", ")
            ),
        },
    };
    let cfg = Config::load(&path)?;
    for notice in &cfg.notices {
        tracing::info!("{notice}");
    }
    Ok(cfg)
}

/// A client for a configuration, with its warnings logged.
pub fn client_for(cfg: &Config) -> Result<Client> {
    client_with(cfg, Limits::default())
}

/// The same with chosen timeouts and bounds.
pub fn client_with(cfg: &Config, limits: Limits) -> Result<Client> {
    let client = Client::from_config(cfg, limits).with_context(|| {
        format!(
            "{}: cannot set up the network cache client",
            cfg.source.display()
        )
    })?;
    for w in &client.warnings {
        tracing::warn!("{w}");
    }
    if client.verifier.is_empty() {
        tracing::warn!(
            "{}: no signature-certificate-list: entries are NOT verified",
            cfg.source.display()
        );
    }
    Ok(client)
}

/// A byte progress bar on stderr when it is a terminal; hidden otherwise. The one place
/// the commands make their bars (`download`, `upload`; [`track`] feeds it from a
/// transfer's progress callback).
pub fn progress_bar(what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// A bar counting items (files, entries) on stderr when it is a terminal; hidden
/// otherwise.
pub fn count_bar(what: &str, total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Updates a bar from a transfer callback.
pub fn track(bar: &ProgressBar) -> impl Fn(u64, Option<u64>) + Send + Sync + '_ {
    move |done, total| {
        if let Some(t) = total {
            bar.set_length(t);
        }
        bar.set_position(done);
    }
}
