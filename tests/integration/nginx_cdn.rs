//! `contrib/nginx-cdn.conf` in front of `shacachefs serve`, as README's "Scaling reads"
//! sets it up: nginx from Debian's packages (`scripts/setup-test-deps` installs it) on a
//! loopback port, the embedded server behind it. An upload goes through, two downloads
//! with the `shacachefs download` CLI read through it, and nginx's log shows the second
//! read of the blob answered from its cache (HIT) while the shadir list always went to
//! serve; `Pragma: no-cache` bypasses the cache; cached blobs are served with serve down.

use crate::support;
use support::files_under;

use shacachefs::digest::Sha512;
use shacachefs::server;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::{run_with_timeout, shacachefs, Server};

const NGINX: &str = "/usr/sbin/nginx";

/// nginx running `contrib/nginx-cdn.conf` (its addresses and cache directory replaced)
/// inside a minimal main configuration, in the foreground as one process.
struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Nginx {
    fn start(dir: &Path, upstream: &str) -> Nginx {
        assert!(
            Path::new(NGINX).exists(),
            "nginx is needed: run scripts/setup-test-deps (it installs Debian's nginx)"
        );
        let contrib = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/nginx-cdn.conf"),
        )
        .unwrap();
        for marker in [
            "listen 8081;",
            "server 127.0.0.1:8080;",
            "/var/cache/nginx/shacache",
        ] {
            assert!(
                contrib.contains(marker),
                "contrib/nginx-cdn.conf lost {marker:?}"
            );
        }
        for _ in 0..5 {
            let port = crate::support::free_port();
            let site = contrib
                .replace("listen 8081;", &format!("listen 127.0.0.1:{port};"))
                .replace("server 127.0.0.1:8080;", &format!("server {upstream};"))
                .replace(
                    "/var/cache/nginx/shacache",
                    dir.join("cache").to_str().unwrap(),
                );
            std::fs::write(dir.join("nginx-cdn.conf"), site).unwrap();
            let d = dir.display();
            let main = format!(
                "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  log_format cdn '$request_method $uri $status $upstream_cache_status';\n  \
                 access_log {d}/access.log cdn;\n  client_body_temp_path {d}/body;\n  \
                 proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
                 uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
                 include {d}/nginx-cdn.conf;\n}}\n"
            );
            std::fs::write(dir.join("nginx.conf"), main).unwrap();
            let mut child = Command::new(NGINX)
                .arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            for _ in 0..200 {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Nginx {
                        child,
                        port,
                        dir: dir.to_path_buf(),
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "nginx did not start: {}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `(method, uri, status, cache status)` of every request nginx logged so far.
    fn log(&self) -> Vec<(String, String, u16, String)> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut p = l.split(' ');
                Some((
                    p.next()?.to_string(),
                    p.next()?.to_string(),
                    p.next()?.parse().ok()?,
                    p.next()?.to_string(),
                ))
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET with extra header lines; returns the status, `X-Cache-Status` and the body.
fn get(port: u16, path: &str, extra: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n{extra}\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let cache = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("x-cache-status")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, cache, raw[split + 4..].to_vec())
}

/// `serve` on a loopback port and nginx in front of it. nginx's directory is outside
/// the server's, so that nginx can outlive the server.
fn serve_behind_nginx() -> (Server, tempfile::TempDir, Nginx) {
    let server = Server::start();
    let nginx_tmp = support::tempdir();
    let upstream = server
        .cache_url()
        .trim_start_matches("http://")
        .trim_end_matches("/shacache")
        .to_string();
    let nginx = Nginx::start(nginx_tmp.path(), &upstream);
    (server, nginx_tmp, nginx)
}

#[test]
fn nginx_in_front_of_serve_caches_blobs_and_passes_the_rest() {
    let (server, _nginx_tmp, nginx) = serve_behind_nginx();
    let work = server.scratch();
    let cfg = support::NetworkcacheConfig::for_urls(
        &format!("{}/shacache", nginx.base()),
        &format!("{}/shadir", nginx.base()),
    )
    .signer_a()
    .write(&work, "through-nginx.cfg");

    // Upload through nginx (POST and PUT pass through to serve).
    let data = support::pseudo_random_bytes(3 << 20, 16);
    let sha = Sha512::of(&data);
    let file = work.join("blob.bin");
    std::fs::write(&file, &data).unwrap();
    let mut up = shacachefs(["upload", "-c"]);
    up.arg(&cfg)
        .args(["-k", "cdn-key", "-f"])
        .arg(&file)
        .arg("file=blob.bin");
    run_with_timeout(up, Duration::from_secs(60)).assert_success();
    assert!(server::blob_path(&server.store(), &sha).is_file());

    // Two downloads through nginx, as two machines would.
    for i in 0..2 {
        let out = work.join(format!("out{i}"));
        let mut down = shacachefs(["download", "-c"]);
        down.arg(&cfg).args(["-k", "cdn-key", "-o"]).arg(&out);
        run_with_timeout(down, Duration::from_secs(60)).assert_success();
        assert!(std::fs::read(&out).unwrap() == data, "download {i} differs");
    }
    let blob_uri = format!("/shacache/{}", sha.hex());
    let log = nginx.log();
    let blob_gets: Vec<&str> = log
        .iter()
        .filter(|(m, u, s, _)| m == "GET" && *u == blob_uri && *s == 200)
        .map(|(_, _, _, c)| c.as_str())
        .collect();
    assert_eq!(blob_gets, ["MISS", "HIT"], "blob reads: {log:?}");
    // The list and the uploads were never served from the cache.
    let lists: Vec<_> = log
        .iter()
        .filter(|(_, u, _, _)| u.starts_with("/shadir/"))
        .collect();
    assert!(lists.len() >= 3, "{log:?}");
    assert!(lists.iter().all(|(_, _, _, c)| c == "-"), "{log:?}");
    assert!(log
        .iter()
        .any(|(m, u, s, c)| m == "POST" && u == "/shacache" && *s == 201 && c == "-"));

    // Asking for a fresh copy goes to serve; otherwise the cache answers.
    let (status, cache, body) = get(nginx.port, &blob_uri, "Pragma: no-cache\r\n");
    assert_eq!((status, cache.as_str()), (200, "BYPASS"));
    assert!(body == data);
    let (status, cache, _) = get(nginx.port, &blob_uri, "Cache-Control: no-cache\r\n");
    assert_eq!((status, cache.as_str()), (200, "BYPASS"));
    let (status, cache, body) = get(nginx.port, &blob_uri, "Range: bytes=10-19\r\n");
    assert_eq!((status, cache.as_str()), (206, "HIT"));
    assert_eq!(body, data[10..20]);

    // With serve gone, cached blobs are still served; lists are not.
    drop(server);
    let (status, cache, body) = get(nginx.port, &blob_uri, "");
    assert_eq!((status, cache.as_str()), (200, "HIT"));
    assert!(body == data);
    let (status, _, _) = get(nginx.port, "/shadir/cdn-key", "");
    assert_eq!(status, 502);
}

/// A bad copy in a cache on the way heals: nginx's cached copy of a blob is corrupted;
/// a fresh mount reading through nginx gets the bad bytes once, fetches again with
/// `Cache-Control`/`Pragma: no-cache` (nginx bypasses its copy and stores the fresh
/// one), reads the right bytes, and nginx's copy is right from then on: a second
/// mount (another machine) is served from nginx's cache.
#[test]
fn a_bad_copy_in_the_cdn_heals_through_a_fresh_fetch() {
    let (server, nginx_tmp, nginx) = serve_behind_nginx();
    let nginx_dir = nginx_tmp.path().to_path_buf();
    let work = server.scratch();
    let direct = server.config().signer_a().write(&work, "direct.cfg");
    let through = support::NetworkcacheConfig::for_urls(
        &format!("{}/shacache", nginx.base()),
        &format!("{}/shadir", nginx.base()),
    )
    .signer_a()
    .write(&work, "through-nginx.cfg");

    let data = support::pseudo_random_bytes(600_000, 17);
    let sha = Sha512::of(&data);
    let file = work.join("heal.bin");
    std::fs::write(&file, &data).unwrap();
    let mut up = shacachefs(["upload", "-c"]);
    up.arg(&direct)
        .args(["-k", "heal-key", "-f"])
        .arg(&file)
        .arg("file=heal.bin");
    run_with_timeout(up, Duration::from_secs(60)).assert_success();
    let blob_uri = format!("/shacache/{}", sha.hex());
    let (status, cache, _) = get(nginx.port, &blob_uri, "");
    assert_eq!((status, cache.as_str()), (200, "MISS"));

    // Rot in nginx's copy (the body is at the end of its cache file).
    let cached = files_under(&nginx_dir.join("cache"));
    assert_eq!(cached.len(), 1, "{cached:?}");
    let mut bytes = std::fs::read(&cached[0]).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 0xff;
    std::fs::write(&cached[0], &bytes).unwrap();
    let (status, cache, body) = get(nginx.port, &blob_uri, "");
    assert_eq!((status, cache.as_str()), (200, "HIT"));
    assert!(
        body != data,
        "the cached copy is not corrupt: the test proves nothing"
    );

    // A fresh mount through nginx reads the right bytes.
    let m = support::Mount::start(&through, &work.join("mount-cache"), &work.join("mnt"), &[]);
    let got = support::read(&m.path("heal-key/heal.bin"));
    assert!(got == data, "the mount read other bytes\n{}", m.log_text());
    drop(m);
    let bypassed = nginx
        .log()
        .iter()
        .filter(|(m, u, _, c)| m == "GET" && *u == blob_uri && c == "BYPASS")
        .count();
    assert_eq!(bypassed, 1, "{:?}", nginx.log());
    // nginx's copy was replaced by the fresh one: a second machine's mount reads
    // through nginx, served from its cache.
    let m = support::Mount::start(
        &through,
        &work.join("mount-cache-2"),
        &work.join("mnt2"),
        &[],
    );
    let got = support::read(&m.path("heal-key/heal.bin"));
    assert!(
        got == data,
        "the second mount read other bytes\n{}",
        m.log_text()
    );
    drop(m);
    let last = nginx
        .log()
        .into_iter()
        .rfind(|(m, u, _, _)| m == "GET" && *u == blob_uri)
        .expect("the second mount's GET");
    assert_eq!(last.3, "HIT", "{:?}", nginx.log());
    let (status, cache, body) = get(nginx.port, &blob_uri, "");
    assert_eq!((status, cache.as_str()), (200, "HIT"));
    assert!(body == data, "nginx still serves its bad copy");
}
