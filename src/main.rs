//! The `shacachefs` binary: parse arguments, set up logging, run one subcommand, turn
//! its error into one line on stderr and a nonzero exit code.

use shacachefs::cli::mount_options::parse_command_line;
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

fn main() -> ExitCode {
    // Also the mount(8) helper's spelling; a mount's `-o` options are applied here.
    let cli = parse_command_line(std::env::args_os()).unwrap_or_else(|e| e.exit());
    // A mount detaches before any thread exists; the parent waits for "ready".
    let notifier = match &cli.command {
        Command::Mount(m) if !m.foreground => match shacachefs::daemon::detach() {
            Ok(n) => Some(n),
            Err(e) => {
                eprintln!("shacachefs: cannot detach: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let default_level = match cli.command {
        Command::Serve(_) | Command::Mount(_) => "info",
        _ => "warn",
    };
    // `-o log_level=…` (fstab) is the mount's spelling of --log-level.
    let o_level = match &cli.command {
        Command::Mount(m) => m.options_log_level.clone(),
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
            Command::Prefetch(a) => commands::prefetch::run(a).await,
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
