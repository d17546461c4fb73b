//! Upstream libnfs's own test suite (tests/test_*.sh and their prog_*.c, from Debian's libnfs
//! source package) against a live mount's folder, through `scripts/libnfs-tests livemount`:
//! every test that needs neither symbolic links, hard links nor device nodes (which livemount
//! refuses, decision 0030) must pass. nfs-ganesha's side of the comparison stays in the
//! on-demand script.
//!
//! Needs root (a network namespace, port 111), gcc, libnfs-dev and `apt-get source libnfs`
//! (scripts/install-deps), or LIBNFS_SRC naming a libnfs source tree. A missing piece fails the
//! test with the script's message; it never skips.
//!
//! Ignored for now: this workplace's Debian mirror answers 404 for libnfs's source files
//! (`apt-get source libnfs`), and upstream's tests may not be copied into this repository, so
//! CI here has no way to get them. Run it with
//! `LIBNFS_SRC=DIR cargo test --test libnfs_upstream -- --ignored`.

use std::process::Command;

#[test]
#[ignore = "needs libnfs's source package (apt-get source libnfs) or LIBNFS_SRC; see the module doc"]
fn upstream_libnfs_tests_pass_against_a_mount_folder() {
    let work = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/libnfs-tests");
    let out = Command::new(script)
        .arg("livemount")
        .env("LIVEMOUNT", env!("CARGO_BIN_EXE_livemount"))
        .env("WORK", work.path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{text}");
    assert!(
        out.status.success(),
        "scripts/libnfs-tests livemount failed ({}); missing tools come from scripts/install-deps\n{text}\n{err}",
        out.status
    );
    let counts = text
        .lines()
        .find(|l| l.starts_with("livemount, server tests:"))
        .unwrap_or_else(|| panic!("no count of the server tests:\n{text}"));
    assert!(counts.contains(", 0 failed"), "{counts}");
}
