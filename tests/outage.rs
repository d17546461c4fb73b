//! Riding through an outage of the repository's store (issue 23) with a real client: libnfs's
//! nfs-cat reads a live-mounted disk while the repository is away (its folder moved aside,
//! which the local store reports as unreachable, as an unmounted share would be). Within the
//! grace the read is held and then served whole; past it the read fails cleanly and the next
//! one, once the store is back, is served without a restart. `status`, `mounts` and
//! `/metrics` tell the outage while it lasts.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn status(server: &Server) -> serde_json::Value {
    serde_json::from_str(&server.cli(&["status", "--json"])).unwrap()
}

/// Waits until `status` says what `ok` wants, or panics after 30 s.
fn wait_status(
    server: &Server,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let s = status(server);
        if ok(&s) {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{what}: {s:#}\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_nfs_read_is_held_through_a_store_outage_and_served_when_it_ends() {
    let t = tempfile::tempdir().unwrap();
    let raw = mixed_disk(6 * MIB, 23);
    let repo = repo_with_disk(t.path(), "ride", &raw);
    let server = Server::start(
        &repo,
        &t.path().join("state"),
        "off",
        &["--store-outage-grace", "60s"],
    );
    server.cli(&["mount", "ride", "--name", "ride"]);
    let s = status(&server);
    assert_eq!(s["store"]["reachable"], true, "{s:#}");
    assert_eq!(s["store"]["grace_seconds"], 60.0, "{s:#}");

    let away = t.path().join("repo-away");
    std::fs::rename(&repo, &away).unwrap();
    let url = server.libnfs_url("ride/d.img");
    let started = Instant::now();
    let reader = std::thread::spawn(move || client("nfs-cat", &[&url]));
    let s = wait_status(&server, "the outage is told", |s| {
        s["store"]["reachable"] == false && s["store"]["held_reads"].as_u64() >= Some(1)
    });
    assert!(s["store"]["unreachable_since"].is_string(), "{s:#}");
    assert!(
        s["store"]["error"]
            .as_str()
            .unwrap()
            .contains("cannot be reached"),
        "{s:#}"
    );
    let text = server.cli(&["status"]);
    assert!(text.contains("UNREACHABLE since"), "{text}");
    let text = server.cli(&["mounts"]);
    assert!(text.contains("store: UNREACHABLE"), "{text}");
    let m = server.metrics();
    assert!(m.contains("livemount_store_up 0"), "{m}");
    assert!(!m.contains("livemount_store_held_reads 0\n"), "{m}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(!reader.is_finished(), "the read must be held, not failed");

    std::fs::rename(&away, &repo).unwrap();
    let out = reader.join().unwrap();
    assert!(out.status.success(), "nfs-cat: {}", output_text(&out));
    assert!(
        out.stdout == raw,
        "nfs-cat read other bytes after the outage"
    );
    assert!(started.elapsed() >= Duration::from_secs(3));
    let s = wait_status(&server, "the recovery is told", |s| {
        s["store"]["reachable"] == true
    });
    assert_eq!(s["store"]["outages"], 1, "{s:#}");
    assert_eq!(s["store"]["held_reads"], 0, "{s:#}");
    assert!(
        s["store"]["last_outage"]["seconds"].as_f64().unwrap() >= 3.0,
        "{s:#}"
    );
    assert!(
        server.log_text().contains("reachable again"),
        "{}",
        server.log_text()
    );
    let m = server.metrics();
    assert!(m.contains("livemount_store_up 1"), "{m}");
    assert!(m.contains("livemount_store_outages_total 1"), "{m}");
    assert!(
        !m.contains("livemount_store_held_read_seconds_count 0\n"),
        "{m}"
    );
}

#[test]
fn past_the_grace_a_held_read_fails_cleanly_and_the_next_is_served_without_a_restart() {
    let t = tempfile::tempdir().unwrap();
    let raw = mixed_disk(4 * MIB, 29);
    let repo = repo_with_disk(t.path(), "late", &raw);
    let server = Server::start(
        &repo,
        &t.path().join("state"),
        "off",
        &["--store-outage-grace", "2s"],
    );
    server.cli(&["mount", "late", "--name", "late"]);
    let away = t.path().join("repo-away");
    std::fs::rename(&repo, &away).unwrap();
    let url = server.libnfs_url("late/d.img");
    let started = Instant::now();
    let out = client("nfs-cat", &[&url]);
    assert!(
        !out.status.success(),
        "a read past the grace must fail: {}",
        output_text(&out)
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(30),
        "failed after {took:?}"
    );
    assert!(
        server.log_text().contains("longer than store_outage_grace"),
        "{}",
        server.log_text()
    );

    std::fs::rename(&away, &repo).unwrap();
    let out = client("nfs-cat", &[&url]);
    assert!(
        out.status.success(),
        "nfs-cat after the outage: {}",
        output_text(&out)
    );
    assert!(
        out.stdout == raw,
        "nfs-cat read other bytes after the outage"
    );
    assert_eq!(status(&server)["store"]["reachable"], true);
}

#[test]
fn a_bad_grace_is_refused_with_the_setting_named() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_disk(t.path(), "g", &mixed_disk(MIB, 3));
    for (grace, says) in [
        ("soon", "--store-outage-grace \"soon\""),
        ("2h", "above 3600 s"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_livemount"))
            .args(["serve", "--repo", repo.to_str().unwrap(), "--state"])
            .arg(t.path().join("state"))
            .args([
                "--nfs",
                "127.0.0.1:0",
                "--api",
                "127.0.0.1:0",
                "--portmap",
                "off",
            ])
            .args(["--store-outage-grace", grace])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let text = output_text(&out);
        assert!(text.contains(says), "{grace}: {text}");
    }
}
