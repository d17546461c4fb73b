//! Running the Debian tools that make test images (sfdisk, mkfs.*, mcopy, dd, curl, ...).

use std::path::Path;
use std::process::{Command, Stdio};

/// Runs a tool (TZ=UTC, no mtools check, no stdin) and returns its standard output, failing
/// the test with what to install when it is missing and with its output when it fails.
pub fn tool(name: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(name)
        .args(args)
        .env("TZ", "UTC")
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {name}: {e} (scripts/install-deps installs curl, fdisk, e2fsprogs, \
                 dosfstools, mtools, ntfs-3g, lvm2, xfsprogs)"
            )
        });
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// [`tool`]'s output as text.
pub fn tool_text(name: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(&tool(name, args)).into_owned()
}

/// A path as the `&str` a tool's argument list takes (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Places the image `fs` at sector `start` of `disk`, holes kept.
pub fn dd_into(disk: &Path, fs: &Path, start: u64) {
    tool(
        "dd",
        &[
            &format!("if={}", s(fs)),
            &format!("of={}", s(disk)),
            "bs=512",
            &format!("seek={start}"),
            "conv=notrunc,sparse",
            "status=none",
        ],
    );
}
