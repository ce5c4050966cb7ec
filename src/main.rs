//! The `shacachefs` binary: parse arguments, set up logging, run one subcommand, turn
//! its error into one line on stderr and a nonzero exit code.

use clap::Parser;
use shacachefs::cli::{Cli, Command};
use shacachefs::commands;
use std::process::ExitCode;

fn init_logging(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::new(v),
        // fuser's own per-request logging is noise for users; RUST_LOG can enable it.
        _ => EnvFilter::new(format!("{},fuser=off", level.unwrap_or("warn"))),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A mount detaches before any thread exists; the parent waits for "ready".
    let notifier = match &cli.command {
        Command::Mount(m)
            if !m.foreground
                && !m
                    .options
                    .iter()
                    .any(|o| o.split(',').any(|x| x == "foreground")) =>
        {
            match shacachefs::daemon::detach() {
                Ok(n) => Some(n),
                Err(e) => {
                    eprintln!("shacachefs: cannot detach: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => None,
    };
    let default_level = match cli.command {
        Command::Serve(_) | Command::Mount(_) => "info",
        _ => "warn",
    };
    init_logging(Some(cli.log_level.as_deref().unwrap_or(default_level)));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shacachefs: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(a) => commands::serve::run(a).await,
            Command::Mount(a) => commands::mount::run(a, notifier).await,
            Command::Upload(a) => commands::upload::run(a).await,
            Command::Download(a) => commands::download::run(a).await,
            Command::Ls(a) => commands::ls::run(a).await,
            Command::Keygen(a) => commands::keygen::run(a),
            Command::Outbox(a) => commands::outbox::run(a).await,
            Command::Fsck(a) => commands::fsck::run(a),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shacachefs: {e:#}");
            ExitCode::FAILURE
        }
    }
}
