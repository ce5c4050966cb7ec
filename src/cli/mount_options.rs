//! The mount's command line in its two spellings, parsed in this one place:
//! `shacachefs mount [FLAGS] MOUNTPOINT [-o OPTS]`, and the mount(8) helper's
//! `mount.fuse.shacachefs SOURCE MOUNTPOINT [-o OPTS]` (what `mount -t fuse.shacachefs`
//! and fstab lines run). Both end as one [`MountArgs`] whose `-o` options are applied
//! onto its flags ([`apply`]): every flag has an `-o` spelling (`cache_size=20G`,
//! `allow_other`, …), `ro` and `log_level=` exist only there, and the options mount(8)
//! and systemd keep for themselves are ignored as mount(8) does.

use super::{parse_size, Cli, Command, MountArgs};
use clap::{CommandFactory, Parser};
use std::ffi::OsString;
use std::path::PathBuf;

/// The names under which the binary acts as the mount(8) helper.
pub(crate) const HELPER_NAMES: [&str; 2] = ["mount.fuse.shacachefs", "mount.shacachefs"];

/// Why a `-o` option was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MountOptionError {
    #[error("unknown mount option -o {0} (every `shacachefs mount` flag is an option: cache_dir=…, dir_ttl=…, allow_other, ro, …)")]
    Unknown(String),
    #[error("mount option -o {0} needs a value (-o {0}=…)")]
    NeedsValue(String),
    #[error("mount option -o {0} takes no value")]
    TakesNoValue(String),
    #[error("mount option -o {name}={value}: {why}")]
    BadValue {
        name: String,
        value: String,
        why: String,
    },
}

/// The binary's command line: the helper's spelling rewritten ([`helper_argv`]), parsed
/// by clap, and a mount's `-o` options applied. A refused option is a clap error, so it
/// prints and exits like any other usage error.
pub fn parse_command_line(argv: impl IntoIterator<Item = OsString>) -> Result<Cli, clap::Error> {
    let argv: Vec<OsString> = argv.into_iter().collect();
    let argv = helper_argv(&argv).unwrap_or(argv);
    let mut cli = Cli::try_parse_from(argv)?;
    if let Command::Mount(m) = &mut cli.command {
        apply(m).map_err(|e| {
            let mut cli = Cli::command();
            cli.build();
            let kind = clap::error::ErrorKind::ValueValidation;
            match cli.find_subcommand_mut("mount") {
                Some(mount) => mount.error(kind, e),
                None => cli.error(kind, e),
            }
        })?;
    }
    Ok(cli)
}

/// `mount.fuse.shacachefs SOURCE MOUNTPOINT [-sfnv] [-o OPTS]` as `shacachefs mount
/// [-c SOURCE] MOUNTPOINT -o OPTS` arguments; `None` when `argv[0]` is not one of
/// [`HELPER_NAMES`]. SOURCE names the configuration unless it is `none`, `shacachefs` or
/// empty (then the default configuration is used). mount(8)'s `-n` (no mtab), `-s`
/// (sloppy) and `-v` (verbose) are dropped, its `-t TYPE` and `-N NAMESPACE` skipped;
/// anything else is passed on (so `-f` runs in the foreground).
pub(crate) fn helper_argv(argv: &[OsString]) -> Option<Vec<OsString>> {
    let name = std::path::Path::new(argv.first()?).file_name()?;
    if !HELPER_NAMES.iter().any(|h| name == *h) {
        return None;
    }
    let mut out: Vec<OsString> = vec!["shacachefs".into(), "mount".into()];
    let mut positional = Vec::new();
    let mut it = argv[1..].iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("-o") => {
                if let Some(v) = it.next() {
                    out.extend(["-o".into(), v.clone()]);
                }
            }
            Some(s) if s.starts_with("-o") => out.extend(["-o".into(), s[2..].into()]),
            Some("-n" | "-s" | "-v") => {}
            Some("-t" | "-N") => {
                it.next();
            }
            _ => positional.push(a.clone()),
        }
    }
    if let [source, mountpoint] = positional.as_slice() {
        if source != "none" && source != "shacachefs" && !source.is_empty() {
            out.extend(["-c".into(), source.clone()]);
        }
        out.push(mountpoint.clone());
    } else {
        out.extend(positional);
    }
    Some(out)
}

/// Options mount(8), libmount and systemd act on themselves (or that mean nothing more
/// for this file system): accepted and ignored, as mount(8) does. `x-*` and `comment=…`
/// (fstab annotations such as `x-systemd.automount`) are ignored too.
const IGNORED: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "nofail",
    "_netdev",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "lazytime",
    "nolazytime",
];

/// Applies the `-o` options of `args` onto its fields, in order after the flags (an
/// option given as a flag and as `-o` takes the `-o` value; `ro` and `rw`: the last
/// wins), and empties `args.options`. Names may be written with `-` or `_`.
pub(crate) fn apply(args: &mut MountArgs) -> Result<(), MountOptionError> {
    let given = std::mem::take(&mut args.options);
    let opts = given
        .iter()
        .flat_map(|o| o.split(','))
        .map(str::trim)
        .filter(|o| !o.is_empty());
    for opt in opts {
        let (written, value) = match opt.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (opt, None),
        };
        let name = written.replace('-', "_");
        if name.starts_with("x_") || name == "comment" || IGNORED.contains(&name.as_str()) {
            continue;
        }
        let flag = |set: &mut bool| match value {
            None => {
                *set = true;
                Ok(())
            }
            Some(_) => Err(MountOptionError::TakesNoValue(written.to_string())),
        };
        let need = || value.ok_or_else(|| MountOptionError::NeedsValue(written.to_string()));
        let bad = |v: &str, why: String| MountOptionError::BadValue {
            name: written.to_string(),
            value: v.to_string(),
            why,
        };
        let number = |v: &str| v.parse::<u64>().map_err(|e| bad(v, e.to_string()));
        let size = |v: &str| parse_size(v).map_err(|e| bad(v, e));
        match name.as_str() {
            "ro" => flag(&mut args.options_ro)?,
            "rw" => {
                let mut rw = false;
                flag(&mut rw)?;
                args.options_ro = !rw;
            }
            "allow_other" => flag(&mut args.allow_other)?,
            "require_signature" => flag(&mut args.require_signature)?,
            "no_passthrough" => flag(&mut args.no_passthrough)?,
            "foreground" => flag(&mut args.foreground)?,
            "retry_uploads" => flag(&mut args.retry_uploads)?,
            "meta" => args.meta.push(need()?.to_string()),
            "key" => args.keys.push(need()?.to_string()),
            "config" => args.config.config = Some(PathBuf::from(need()?)),
            "cache_dir" => args.cache_dir = Some(PathBuf::from(need()?)),
            "log_file" => args.log_file = Some(PathBuf::from(need()?)),
            "log_level" => args.options_log_level = Some(need()?.to_string()),
            "cache_size" => args.cache_size = size(need()?)?,
            "max_dir_body" => args.max_dir_body = size(need()?)?,
            "dir_ttl" => args.dir_ttl = number(need()?)?,
            "negative_ttl" => args.negative_ttl = number(need()?)?,
            "low_speed_timeout" => args.low_speed_timeout = number(need()?)?,
            "connect_timeout" => args.connect_timeout = number(need()?)?,
            "metrics_listen" => {
                let v = need()?;
                args.metrics_listen = Some(crate::metrics::parse_listen(v).map_err(|e| bad(v, e))?);
            }
            "max_json_depth" => {
                let v = need()?;
                args.max_json_depth = v.parse().map_err(|e| bad(v, format!("{e}")))?;
            }
            _ => return Err(MountOptionError::Unknown(opt.to_string())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
