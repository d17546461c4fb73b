//! Fuzz target: everything an initiator says on one iSCSI connection (login, then commands,
//! data, task management, text, logout), answered by the target against disks in memory.
//! Any panic, hang or unbounded allocation is a finding; so is a write reaching the
//! read-only LUN, or a range past a disk's end reaching it (the in-memory disk panics on
//! both).
//! The first byte picks the start: bit 1 sends the rest as it is (the login fuzzed too);
//! otherwise a well-formed one-PDU login comes first (bit 0: a discovery session, else a
//! normal session on the open target, whose CmdSN starts at 0) and the rest follows it.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use livemount::iscsi::fuzzing::{Harness, OPEN_TARGET};

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
    let mut input = Harness::login(if mode & 1 != 0 { None } else { Some(OPEN_TARGET) });
    input.extend_from_slice(rest);
    h.stream(&input);
});
