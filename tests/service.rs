//! Running as a service: `contrib/livemount.service` passes `systemd-analyze verify` (pointed
//! at the binary under test), and `serve` speaks the service manager's notify protocol: READY=1
//! on NOTIFY_SOCKET once its ports listen, STOPPING=1 when it is asked to stop.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::{livemount_ok, Server};

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/livemount.service"
    ))
    .unwrap();
    let exec = "ExecStart=/usr/local/bin/livemount serve";
    assert_eq!(unit.matches(exec).count(), 1, "{unit}");
    let unit = unit.replace(
        exec,
        &format!("ExecStart={} serve", env!("CARGO_BIN_EXE_livemount")),
    );
    let path = tmp.path().join("livemount.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", path.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| {
            panic!("running systemd-analyze: {e} (scripts/install-deps installs systemd)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "systemd-analyze verify: {text}");
    // Warnings about the unit itself fail too (others' units may warn on some machines).
    assert!(!text.contains("livemount.service"), "{text}");
}

/// The next message on the socket, or a failure after a minute.
fn next(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("no notify message within 60 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn serve_says_ready_once_it_listens_and_stopping_when_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    livemount_ok(&["repo", "init", repo.to_str().unwrap()]);
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let env = [(
        "NOTIFY_SOCKET".to_string(),
        sock_path.to_str().unwrap().to_string(),
    )];
    let server = Server::start_env(
        repo.to_str().unwrap(),
        &tmp.path().join("state"),
        "off",
        &[],
        &env,
    );
    let ready = next(&sock);
    let lines: Vec<&str> = ready.lines().collect();
    assert!(lines.contains(&"READY=1"), "{ready:?}");
    assert!(lines.contains(&"STATUS=serving 0 mounts"), "{ready:?}");
    // Ready means listening: NFS takes a connection (the API did, for `status` above).
    std::net::TcpStream::connect(("127.0.0.1", server.nfs_port)).unwrap();
    let status = server.stop();
    let stopping = next(&sock);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(status.success(), "{status}");
}
