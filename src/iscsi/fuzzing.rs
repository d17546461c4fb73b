//! Support for fuzzing and hostile-input tests of the iSCSI target (not part of the API).
//!
//! Must not: be used by the server itself.
