//! `shacachefs serve`: the embedded server in the foreground until SIGINT or SIGTERM.

use crate::cli::ServeArgs;
use crate::server::{self, Limits, ServerMetrics, ServerOptions, TlsOptions};
use anyhow::{bail, Context, Result};

/// The environment variable that may hold `USER:PASS` for uploads.
pub const UPLOAD_USER_ENV: &str = "SHACACHEFS_UPLOAD_USER";

/// `USER:PASS` split; `from` names where it came from, for the error.
fn split_user(s: &str, from: &str) -> Result<(String, String)> {
    match s.split_once(':') {
        Some((u, p)) if !u.is_empty() => Ok((u.to_string(), p.to_string())),
        _ => bail!("{from} must hold USER:PASS"),
    }
}

/// The upload credentials: the flag, else the file, else the environment.
fn upload_user(args: &ServeArgs) -> Result<Option<(String, String)>> {
    if let Some(s) = &args.upload_user {
        return split_user(s, "--upload-user").map(Some);
    }
    if let Some(path) = &args.upload_user_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
        return split_user(line, &format!("the first line of {}", path.display())).map(Some);
    }
    match std::env::var(UPLOAD_USER_ENV) {
        Ok(s) if !s.is_empty() => split_user(&s, UPLOAD_USER_ENV).map(Some),
        _ => Ok(None),
    }
}

pub async fn run(args: ServeArgs) -> Result<()> {
    let upload_user = upload_user(&args)?;
    match server::raise_nofile_limit() {
        Ok(n) => tracing::debug!(nofile = n, "open-file limit"),
        Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
    }
    let limits = Limits {
        header_timeout: args.header_timeout,
        body_idle_timeout: args.body_idle_timeout,
        body_min_rate: args.body_min_rate,
        send_timeout: args.send_timeout,
        max_connections: args.max_connections,
        max_connections_per_client: args.max_connections_per_client,
        max_uploads: args.max_uploads,
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
    let metrics = std::sync::Arc::new(ServerMetrics::default());
    if let Some(at) = args.metrics_listen {
        let render = crate::metrics::render_registry(metrics.registry());
        let bound = crate::metrics::start(at, render)
            .await
            .with_context(|| format!("--metrics-listen {at}"))?;
        eprintln!("  metrics            = http://{bound}/metrics");
    }
    let opts = ServerOptions {
        root: args.root,
        upload_user,
        tls,
    };
    server::serve_counted(listener, opts, limits, metrics, shutdown_signal()).await?;
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
