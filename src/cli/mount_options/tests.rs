//! Every spelling the README and `contrib/` use, both command-line forms, and refusals.

use super::*;
use std::path::Path;

fn argv(words: &[&str]) -> Vec<OsString> {
    words.iter().map(OsString::from).collect()
}

/// The mount arguments of a command line, `-o` applied.
fn mount_args(words: &[&str]) -> MountArgs {
    match parse_command_line(argv(words)) {
        Ok(Cli {
            command: Command::Mount(m),
            ..
        }) => m,
        Ok(other) => panic!("{words:?}: not a mount: {other:?}"),
        Err(e) => panic!("{words:?}: {e}"),
    }
}

/// The error of a `shacachefs mount /mnt -o OPTS`.
fn refusal(opts: &str) -> MountOptionError {
    let mut m = mount_args(&["shacachefs", "mount", "/mnt"]);
    m.options = vec![opts.to_string()];
    apply(&mut m).expect_err(opts)
}

/// The fields a mount uses, comparable (`MountArgs` itself is not `PartialEq`).
fn summary(m: &MountArgs) -> String {
    format!("{m:?}")
}

#[test]
fn every_option_sets_its_flag() {
    let m = mount_args(&[
        "shacachefs",
        "mount",
        "/mnt/x",
        "-o",
        "ro,allow_other,require_signature,no_passthrough,foreground,retry_uploads",
        "-o",
        "cache_dir=/c,cache_size=20G,dir_ttl=60,negative_ttl=5,key=a,key=b,meta=k=v=w",
        "-o",
        "log_file=/l,low_speed_timeout=7,connect_timeout=3,max_dir_body=1M,max_json_depth=9",
        "-o",
        "log_level=debug,config=/cfg",
    ]);
    assert!(m.options.is_empty(), "applied options are consumed");
    assert!(m.options_ro && m.allow_other && m.require_signature && m.no_passthrough);
    assert!(m.foreground && m.retry_uploads);
    assert_eq!(m.mountpoint, Path::new("/mnt/x"));
    assert_eq!(m.cache_dir.as_deref(), Some(Path::new("/c")));
    assert_eq!(m.cache_size, 20 << 30);
    assert_eq!((m.dir_ttl, m.negative_ttl), (60, 5));
    assert_eq!(m.keys, ["a", "b"]);
    assert_eq!(m.meta, ["k=v=w"]);
    assert_eq!(m.log_file.as_deref(), Some(Path::new("/l")));
    assert_eq!((m.low_speed_timeout, m.connect_timeout), (7, 3));
    assert_eq!((m.max_dir_body, m.max_json_depth), (1 << 20, 9));
    assert_eq!(m.options_log_level.as_deref(), Some("debug"));
    assert_eq!(m.config.config.as_deref(), Some(Path::new("/cfg")));
}

#[test]
fn every_flag_of_mount_has_an_option_spelling() {
    let cmd = Cli::command();
    let mount = cmd.find_subcommand("mount").expect("a mount subcommand");
    let mut checked = 0;
    for arg in mount.get_arguments() {
        let Some(long) = arg.get_long().filter(|l| !["help", "version"].contains(l)) else {
            continue;
        };
        let name = long.replace('-', "_");
        let mut m = mount_args(&["shacachefs", "mount", "/mnt"]);
        m.options = vec![name.clone()];
        let bare = apply(&mut m);
        if arg.get_action().takes_values() {
            assert_eq!(bare, Err(MountOptionError::NeedsValue(name)), "--{long}");
        } else {
            assert_eq!(bare, Ok(()), "--{long}");
        }
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} flags seen");
}

#[test]
fn options_come_after_the_flags_and_accept_dashes() {
    let m = mount_args(&[
        "shacachefs",
        "mount",
        "--cache-size",
        "1G",
        "--key",
        "flag-key",
        "/mnt",
        "-o",
        "cache-size=2G,allow-other,key=opt-key",
    ]);
    assert_eq!(m.cache_size, 2 << 30);
    assert!(m.allow_other);
    assert_eq!(m.keys, ["flag-key", "opt-key"]);
    assert!(!mount_args(&["shacachefs", "mount", "/m", "-o", "ro,rw"]).options_ro);
    assert!(mount_args(&["shacachefs", "mount", "/m", "-o", "rw,ro"]).options_ro);
    // Spaces and empty items between commas are tolerated.
    let m = mount_args(&["shacachefs", "mount", "/m", "-o", " ro,, dir_ttl=4 ,"]);
    assert!(m.options_ro);
    assert_eq!(m.dir_ttl, 4);
}

#[test]
fn what_mount8_and_systemd_keep_for_themselves_is_ignored() {
    let plain = mount_args(&["shacachefs", "mount", "/m"]);
    let ignored = mount_args(&[
        "shacachefs",
        "mount",
        "/m",
        "-o",
        "defaults,rw,auto,noauto,nofail,_netdev,user,users,nouser,owner,group",
        "-o",
        "dev,nodev,suid,nosuid,exec,noexec,atime,noatime,relatime,nodiratime,lazytime",
        "-o",
        "x-systemd.automount,x-systemd.requires=network-online.target",
        "-o",
        "x-systemd.mount-timeout=30,x-initrd.mount,comment=systemd.automount",
    ]);
    assert_eq!(summary(&ignored), summary(&plain));
}

#[test]
fn unknown_or_malformed_options_are_refused_clearly() {
    let e = refusal("cache_size=1G,bogus");
    assert_eq!(e, MountOptionError::Unknown("bogus".into()));
    assert!(
        e.to_string().contains("unknown mount option -o bogus"),
        "{e}"
    );
    assert_eq!(
        refusal("bogus=3"),
        MountOptionError::Unknown("bogus=3".into())
    );
    // `sync` would promise synchronous writes: not silently ignored.
    assert_eq!(refusal("sync"), MountOptionError::Unknown("sync".into()));
    assert_eq!(
        refusal("cache_dir"),
        MountOptionError::NeedsValue("cache_dir".into())
    );
    assert_eq!(
        refusal("ro=yes"),
        MountOptionError::TakesNoValue("ro".into())
    );
    let e = refusal("dir_ttl=soon");
    assert!(
        matches!(&e, MountOptionError::BadValue { name, value, .. } if name == "dir_ttl" && value == "soon"),
        "{e:?}"
    );
    assert!(matches!(
        refusal("cache_size=12Q"),
        MountOptionError::BadValue { .. }
    ));
    // Through the whole command line: a usage error naming the option.
    let e = parse_command_line(argv(&["shacachefs", "mount", "/m", "-o", "nosuch"]))
        .expect_err("an unknown option");
    assert!(
        e.to_string().contains("unknown mount option -o nosuch"),
        "{e}"
    );
}

#[test]
fn the_helper_form_is_the_mount_command() {
    let helper = mount_args(&[
        "/sbin/mount.fuse.shacachefs",
        "/etc/cfg",
        "/mnt/s",
        "-n",
        "-s",
        "-v",
        "-o",
        "rw,cache_size=3G,key=k",
    ]);
    let direct = mount_args(&[
        "shacachefs",
        "mount",
        "-c",
        "/etc/cfg",
        "/mnt/s",
        "-o",
        "rw,cache_size=3G,key=k",
    ]);
    assert_eq!(summary(&helper), summary(&direct));
    assert_eq!(helper.cache_size, 3 << 30);
    // A source of `none` or `shacachefs` means the default configuration.
    for source in ["none", "shacachefs"] {
        let m = mount_args(&["mount.shacachefs", source, "/mnt/s", "-oro"]);
        assert_eq!(m.config.config, None);
        assert!(m.options_ro);
    }
    // libmount's `-t TYPE` (and `-N NAMESPACE`) take a value: neither is a path.
    let m = mount_args(&[
        "mount.fuse.shacachefs",
        "/c",
        "/m",
        "-t",
        "fuse.shacachefs",
        "-o",
        "ro",
    ]);
    assert_eq!(m.mountpoint, Path::new("/m"));
    assert!(helper_argv(&argv(&["shacachefs", "mount", "/m"])).is_none());
}

#[test]
fn the_shipped_fstab_lines_mount() {
    let sources = [
        include_str!("../../../contrib/fstab.example"),
        include_str!("../../../README.md"),
    ];
    let mut lines = 0;
    for text in sources {
        for line in text.lines().map(str::trim) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [source, target, "fuse.shacachefs", opts, _, _] = fields.as_slice() else {
                continue;
            };
            // What mount(8) runs for this line.
            let m = mount_args(&["mount.fuse.shacachefs", source, target, "-o", opts]);
            assert_eq!(m.config.config.as_deref(), Some(Path::new(source)));
            assert_eq!(m.mountpoint, Path::new(target));
            assert!(opts.contains("cache_size=20G") && m.cache_size == 20 << 30);
            lines += 1;
        }
    }
    assert!(lines >= 2, "fstab lines found: {lines}");
}

#[test]
fn the_shipped_helper_and_unit_use_names_the_binary_knows() {
    let helper = include_str!("../../../contrib/mount.fuse.shacachefs");
    let mut names = 0;
    for word in helper.split("exec -a ").skip(1) {
        let name = word.split_whitespace().next().unwrap_or_default();
        assert!(HELPER_NAMES.contains(&name), "{name}");
        names += 1;
    }
    assert!(names >= 1);
    let unit = include_str!("../../../contrib/shacachefs@.service");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let words: Vec<&str> = exec
        .split_whitespace()
        .map(|w| if w == "%f" { "/mnt/shacache" } else { w })
        .collect();
    let m = mount_args(&words);
    assert!(m.foreground);
    assert_eq!(m.mountpoint, Path::new("/mnt/shacache"));
}

#[test]
fn metrics_listen_as_a_flag_and_an_option() {
    let m = mount_args(&["shacachefs", "mount", "/mnt", "--metrics-listen", "9100"]);
    assert_eq!(m.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
    let m = mount_args(&[
        "shacachefs",
        "mount",
        "/mnt",
        "-o",
        "metrics_listen=0.0.0.0:9101",
    ]);
    assert_eq!(m.metrics_listen, Some("0.0.0.0:9101".parse().unwrap()));
    // The mount(8) helper's form.
    let m = mount_args(&[
        "mount.fuse.shacachefs",
        "/cfg",
        "/mnt",
        "-o",
        "metrics-listen=9102",
    ]);
    assert_eq!(m.metrics_listen, Some("127.0.0.1:9102".parse().unwrap()));
    assert!(matches!(
        refusal("metrics_listen=localhost"),
        MountOptionError::BadValue { .. }
    ));
    assert!(matches!(
        refusal("metrics_listen"),
        MountOptionError::NeedsValue(_)
    ));
}
