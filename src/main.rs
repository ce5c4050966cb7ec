//! The `shacachefs` binary: parse arguments, set up logging, run one subcommand, turn
//! its error into one line on stderr and a nonzero exit code.

use clap::Parser;
use shacachefs::cli::{Cli, Command};
use shacachefs::commands;
use std::process::ExitCode;

fn init_logging(level: Option<&str>, ansi: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::new(v),
        // fuser's own per-request logging is noise for users; RUST_LOG can enable it.
        _ => EnvFilter::new(format!("{},fuser=off", level.unwrap_or("warn"))),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .init();
}

/// The man page or a completion script, generated from the CLI definition.
fn generate(what: &str) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut out = std::io::stdout();
    if what == "man" {
        clap_mangen::Man::new(cmd).render(&mut out)?;
        return Ok(());
    }
    let shell: clap_complete::Shell = what.parse().map_err(|_| {
        anyhow::anyhow!("generate: `man` or a shell (bash, zsh, fish, elvish, powershell)")
    })?;
    clap_complete::generate(shell, &mut cmd, "shacachefs", &mut out);
    Ok(())
}

/// `mount -t fuse.shacachefs CONFIG MOUNTPOINT -o OPTS` (and fstab) run
/// `mount.fuse.shacachefs CONFIG MOUNTPOINT -o OPTS`: the same as
/// `shacachefs mount -c CONFIG MOUNTPOINT -o OPTS`.
fn mount_helper_args() -> Option<Vec<std::ffi::OsString>> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let argv0 = std::path::Path::new(args.first()?)
        .file_name()?
        .to_string_lossy()
        .into_owned();
    if argv0 != "mount.fuse.shacachefs" && argv0 != "mount.shacachefs" {
        return None;
    }
    let rest = args.split_off(1);
    let mut out: Vec<std::ffi::OsString> = vec!["shacachefs".into(), "mount".into()];
    let mut positional = Vec::new();
    let mut it = rest.into_iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("-o") => {
                if let Some(v) = it.next() {
                    out.push("-o".into());
                    out.push(v);
                }
            }
            // mount(8) flags: -n (no mtab), -s (sloppy), -f (fake), -v (verbose).
            Some("-n") | Some("-s") | Some("-v") => {}
            _ => positional.push(a),
        }
    }
    if let [source, mountpoint] = positional.as_slice() {
        if source != "none" && source != "shacachefs" && !source.is_empty() {
            out.push("-c".into());
            out.push(source.clone());
        }
        out.push(mountpoint.clone());
    } else {
        out.extend(positional);
    }
    Some(out)
}

fn main() -> ExitCode {
    let cli = match mount_helper_args() {
        Some(args) => Cli::parse_from(args),
        None => Cli::parse(),
    };
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
    // `-o log_level=…` (fstab) is the mount's spelling of --log-level.
    let o_level = match &cli.command {
        Command::Mount(m) => m
            .options
            .iter()
            .flat_map(|o| o.split(','))
            .find_map(|o| o.strip_prefix("log_level=").map(str::to_string)),
        _ => None,
    };
    let level = cli.log_level.clone().or(o_level);
    // Colours only on a terminal: a detached mount's log goes to a file (or nowhere).
    let ansi = notifier.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    init_logging(Some(level.as_deref().unwrap_or(default_level)), ansi);
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
    // A detached mount's start-up error reaches the user through the waiting parent.
    let detached = notifier.is_some();
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
            Command::Status(a) => commands::status::run(a),
            Command::Generate(a) => generate(&a.what),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) if detached => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("shacachefs: {}", commands::error_line(&e));
            ExitCode::FAILURE
        }
    }
}
