//! `shacachefs keygen`: an RSA key and a self-signed certificate, like the reference
//! tooling's `generate-signature-key`, refusing to overwrite anything.

use crate::cli::KeygenArgs;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::Path;

fn refuse_existing(path: &Path, what: &str) -> Result<()> {
    if path.symlink_metadata().is_ok() {
        bail!("{what} {} exists, will not overwrite", path.display());
    }
    Ok(())
}

/// Creates a new file that must not exist, with the given mode.
pub(crate) fn write_new(path: &Path, data: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(data.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

pub fn run(args: KeygenArgs) -> Result<()> {
    if args.bits < 2048 {
        bail!("--bits must be at least 2048 for a new key");
    }
    refuse_existing(&args.key_file, "key")?;
    if let Some(cert) = &args.cert_file {
        refuse_existing(cert, "certificate")?;
    }
    eprintln!(
        "Generating a {}-bit RSA key for {:?}…",
        args.bits, args.common_name
    );
    let (key_pem, cert_pem) = crate::signature::generate(args.bits, &args.common_name)?;
    write_new(&args.key_file, &key_pem, 0o600)?;
    match &args.cert_file {
        Some(cert) => {
            write_new(cert, &cert_pem, 0o644)?;
            eprintln!(
                "key: {}\ncertificate: {}",
                args.key_file.display(),
                cert.display()
            );
        }
        None => print!("{cert_pem}"),
    }
    eprintln!("Add the certificate to signature-certificate-list in your configuration.");
    Ok(())
}
