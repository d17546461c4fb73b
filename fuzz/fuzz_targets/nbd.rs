//! Fuzz target: everything a client says on one NBD connection (handshake, options,
//! requests), answered by the server against two disks in memory. Any panic, hang or
//! unbounded allocation is a finding; so is a write reaching the read-only disk, or a range
//! past a disk's end reaching it (the in-memory disk panics on both).
//! The first byte picks the start: bit 0 opens the read-only export, bit 1 sends the rest as
//! it is (the handshake fuzzed too); otherwise a well-formed NBD_OPT_GO comes first and the
//! rest is requests; bit 2 asks for structured replies and `base:allocation` before it.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use livemount::nbd::fuzzing::Harness;

static HARNESS: OnceLock<Harness> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let h = HARNESS.get_or_init(|| Harness::new().expect("fuzz harness"));
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 2 != 0 {
        h.stream(rest);
        return;
    }
    let export = if mode & 1 != 0 { "m/ro.img" } else { "m/rw.img" };
    let mut input = if mode & 4 != 0 {
        Harness::go_structured(export)
    } else {
        Harness::go(export)
    };
    input.extend_from_slice(rest);
    h.stream(&input);
});
