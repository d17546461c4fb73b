//! Fuzz target: one RPC call record, as the NFS front hands it to the dispatch, answered by a
//! whole datastore (a repository and a read-write live mount). Any panic, hang or unbounded
//! allocation is a finding. Inputs may pick a well-formed call of any procedure to mutate (see `Harness::call_structured`).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use livemount::nfs::fuzzing::Harness;

static HARNESS: OnceLock<Harness> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let h = HARNESS.get_or_init(|| Harness::new().expect("fuzz harness"));
    h.call_structured(data);
});
