//! `shacachefs serve`: the embedded server in the foreground until SIGINT or SIGTERM.

use crate::cli::ServeArgs;
use crate::server::{self, ServerOptions, TlsOptions};
use anyhow::{bail, Context, Result};

pub async fn run(args: ServeArgs) -> Result<()> {
    let upload_user = match &args.upload_user {
        Some(s) => match s.split_once(':') {
            Some((u, p)) if !u.is_empty() => Some((u.to_string(), p.to_string())),
            _ => bail!("--upload-user must be USER:PASS"),
        },
        None => None,
    };
    std::fs::create_dir_all(&args.root)
        .with_context(|| format!("cannot create {}", args.root.display()))?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsOptions {
            cert_file: cert.clone(),
            key_file: key.clone(),
            client_ca_file: args.client_ca.clone(),
        }),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    eprintln!(
        "shacachefs: serving {} on {scheme}://{addr}",
        args.root.display()
    );
    eprintln!("  download-cache-url = {scheme}://{addr}/shacache");
    eprintln!("  download-dir-url   = {scheme}://{addr}/shadir");
    let opts = ServerOptions {
        root: args.root,
        upload_user,
        tls,
    };
    server::serve(listener, opts, shutdown_signal()).await?;
    eprintln!("shacachefs: server stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
