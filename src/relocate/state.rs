//! The relocation state machine: what a relocation is (persisted as `relocations/MOUNT.json`),
//! the events that move it, and what a server that starts with it must do.
//!
//! Pure: no I/O, no clock. The coordinator ([`super`]) applies an event, persists the result
//! (tmp, fsync, rename) and only then acts on it, so a restart at any point finds a record
//! that says what is done.
//!
//! ```text
//!            Copied (all disks)          Finish                Verified          Retired
//! Copying ─────────────────────▶ Synced ────────▶ Finishing ───────────▶ Done ────────▶ (gone)
//!   │  ▲          Finish ───────────────────────────▲ │
//!   │  └─ Retry ── Failed ◀── Fail (Copying, Synced, Finishing)
//!   └──── Cancel (Copying, Synced, Finishing, Failed) ──▶ Cancelling ── CleanedUp ──▶ (gone)
//! ```
//! `copied` per disk is the durable frontier: every byte below it was in the destination file
//! and synced when the record was written. A failure resets it (writes the VM made while the
//! mirror was down are not in the copy), so a retry copies from the start.

use std::path::PathBuf;

use crate::repo::SnapshotId;

/// Where a relocation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Copying in the background while the VM runs; its writes follow to the copy.
    Copying,
    /// Every block copied; the copy follows the VM's writes until the handover.
    Synced,
    /// Handover under way: the VM's writes are fenced, the rest copied, the copy verified.
    Finishing,
    /// Copy verified and its config written; the mount is being retired.
    Done,
    /// Cancel under way: the partial copy is being removed.
    Cancelling,
    /// Stopped by an error (in `error`); the mount runs as before. Retry or cancel.
    Failed,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Copying => "copying",
            Phase::Synced => "synced",
            Phase::Finishing => "finishing",
            Phase::Done => "done",
            Phase::Cancelling => "cancelling",
            Phase::Failed => "failed",
        })
    }
}

/// One disk's copy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskCopy {
    /// The disk file's name, in the mount's folder and in the destination.
    pub file: String,
    pub size: u64,
    /// Durable frontier: bytes from the start known copied and synced.
    pub copied: u64,
}

/// A relocation as persisted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relocation {
    pub mount: String,
    /// The mount's snapshot: a record is only ever applied to the mount it was made for.
    pub snapshot: SnapshotId,
    /// The destination folder.
    pub dest: PathBuf,
    /// Copy at most this many bytes per second (`--rate`); none: as fast as VM reads allow.
    #[serde(default)]
    pub rate: Option<u64>,
    /// Benchmarks only: copy in the VM class, ignoring VM reads (`--no-priority`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unprioritized: bool,
    pub phase: Phase,
    pub disks: Vec<DiskCopy>,
    pub started: jiff::Timestamp,
    /// The last error, in `Failed` (and a cleanup error in `Cancelling`).
    #[serde(default)]
    pub error: Option<String>,
}

/// What happens to a relocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Disk `disk` is copied and synced up to `upto` bytes.
    Copied { disk: usize, upto: u64 },
    /// The operator asks for the handover (the VM is stopped).
    Finish,
    /// The destination equals the mount's view and its config is written.
    Verified,
    /// The mount is retired; the relocation is over.
    Retired,
    /// The operator cancels.
    Cancel,
    /// The partial copy is removed.
    CleanedUp,
    /// Something failed (the destination cannot be written, verify found a difference).
    Fail(String),
    /// The operator starts the relocation again after a failure.
    Retry,
}

/// The record after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Keep(Relocation),
    /// The relocation is over; its record goes.
    Gone,
}

/// An event that does not apply in the relocation's phase: nothing changes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("relocation of {mount} is {phase}: {what}")]
pub struct Refused {
    pub mount: String,
    pub phase: Phase,
    pub what: String,
}

/// What a starting server does with a relocation it finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Go on copying from each disk's `copied`; writes follow.
    Copy,
    /// Nothing to copy; writes follow until the handover.
    Follow,
    /// Fence the VM's writes and carry out the handover from its start.
    Finish,
    /// The copy is handed over: retire the mount, drop the record.
    Retire,
    /// Remove the partial copy, drop the record.
    CleanUp,
    /// Failed: keep the record for the operator, copy nothing.
    Idle,
}

impl Relocation {
    /// A new relocation of `mount`'s disks (file name and size each) into `dest`.
    pub fn new(
        mount: &str,
        snapshot: SnapshotId,
        dest: PathBuf,
        disks: Vec<(String, u64)>,
        rate: Option<u64>,
        started: jiff::Timestamp,
    ) -> Relocation {
        let disks: Vec<DiskCopy> = disks
            .into_iter()
            .map(|(file, size)| DiskCopy {
                file,
                size,
                copied: 0,
            })
            .collect();
        let phase = if disks.iter().all(|d| d.size == 0) {
            Phase::Synced
        } else {
            Phase::Copying
        };
        Relocation {
            mount: mount.to_string(),
            snapshot,
            dest,
            rate,
            unprioritized: false,
            phase,
            disks,
            started,
            error: None,
        }
    }

    pub fn total(&self) -> u64 {
        self.disks.iter().map(|d| d.size).sum()
    }

    pub fn copied(&self) -> u64 {
        self.disks.iter().map(|d| d.copied).sum()
    }

    fn all_copied(&self) -> bool {
        self.disks.iter().all(|d| d.copied == d.size)
    }

    fn refuse(&self, what: impl Into<String>) -> Refused {
        Refused {
            mount: self.mount.clone(),
            phase: self.phase,
            what: what.into(),
        }
    }

    /// Applies `event`. A refused event changes nothing.
    pub fn apply(&self, event: Event) -> Result<Next, Refused> {
        use Phase::*;
        let mut r = self.clone();
        match (self.phase, event) {
            (Copying | Synced | Finishing, Event::Copied { disk, upto }) => {
                let Some(d) = r.disks.get_mut(disk) else {
                    return Err(self.refuse(format!("it has no disk {disk}")));
                };
                if upto < d.copied || upto > d.size {
                    return Err(self.refuse(format!(
                        "{} cannot move from {} to {} bytes copied of {}",
                        d.file, d.copied, upto, d.size
                    )));
                }
                d.copied = upto;
                if r.phase == Copying && r.all_copied() {
                    r.phase = Synced;
                }
            }
            (Copying | Synced | Finishing, Event::Finish) => r.phase = Finishing,
            (Finishing, Event::Verified) => {
                if !r.all_copied() {
                    return Err(self.refuse("not every block is copied yet"));
                }
                r.phase = Done;
            }
            (Done, Event::Retired) => return Ok(Next::Gone),
            (Copying | Synced | Finishing | Failed | Cancelling, Event::Cancel) => {
                // An earlier failure is history now; a cleanup failure sets it again.
                r.phase = Cancelling;
                r.error = None;
            }
            (Cancelling, Event::CleanedUp) => return Ok(Next::Gone),
            (Copying | Synced | Finishing | Failed, Event::Fail(why)) => {
                r.phase = Failed;
                r.error = Some(why);
                for d in &mut r.disks {
                    d.copied = 0;
                }
            }
            (Cancelling, Event::Fail(why)) => r.error = Some(why),
            (Failed, Event::Retry) => {
                r.phase = if r.disks.iter().all(|d| d.size == 0) {
                    Synced
                } else {
                    Copying
                };
                r.error = None;
            }
            (Done, _) => {
                return Err(
                    self.refuse("the copy is handed over already; the mount is being retired")
                )
            }
            (Cancelling, _) => {
                return Err(self.refuse("it is being cancelled; start a new relocation after"))
            }
            (Failed, Event::Finish) => {
                return Err(self.refuse(format!(
                "it failed ({}); run `livemount relocate {} --to {}` again to retry, or --cancel",
                self.error.as_deref().unwrap_or("no reason recorded"),
                self.mount,
                self.dest.display()
            )))
            }
            (_, e) => return Err(self.refuse(format!("{e:?} does not apply"))),
        }
        Ok(Next::Keep(r))
    }

    /// What a server starting with this record does.
    pub fn on_start(&self) -> Resume {
        match self.phase {
            Phase::Copying => Resume::Copy,
            Phase::Synced => Resume::Follow,
            Phase::Finishing => Resume::Finish,
            Phase::Done => Resume::Retire,
            Phase::Cancelling => Resume::CleanUp,
            Phase::Failed => Resume::Idle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Phase; 6] = [
        Phase::Copying,
        Phase::Synced,
        Phase::Finishing,
        Phase::Done,
        Phase::Cancelling,
        Phase::Failed,
    ];

    fn record(phase: Phase) -> Relocation {
        let mut r = Relocation::new(
            "web01-lm1",
            crate::repo::SnapshotId::from_hex(&"ab".repeat(32)).unwrap(),
            PathBuf::from("/primary/web01"),
            vec![("a.img".into(), 4 << 20), ("b.img".into(), 2 << 20)],
            None,
            "2026-11-22T10:00:00Z".parse().unwrap(),
        );
        r.phase = phase;
        if matches!(phase, Phase::Synced | Phase::Done) {
            for d in &mut r.disks {
                d.copied = d.size;
            }
        }
        if phase == Phase::Failed {
            r.error = Some("disk full".into());
        }
        r
    }

    fn kept(n: Result<Next, Refused>) -> Relocation {
        match n {
            Ok(Next::Keep(r)) => r,
            other => panic!("expected a kept record, got {other:?}"),
        }
    }

    fn events() -> Vec<Event> {
        vec![
            Event::Copied {
                disk: 0,
                upto: 1 << 20,
            },
            Event::Finish,
            Event::Verified,
            Event::Retired,
            Event::Cancel,
            Event::CleanedUp,
            Event::Fail("x".into()),
            Event::Retry,
        ]
    }

    /// Every (phase, event) pair: the phase it leads to, or refused. Written out in full so a
    /// change to any transition shows here.
    #[test]
    fn every_transition() {
        use Phase::*;
        // None: refused. Some(None): the record goes. Some(Some(p)): kept in phase p.
        let table: [(Phase, [Option<Option<Phase>>; 8]); 6] = [
            (
                Copying,
                [
                    Some(Some(Copying)),
                    Some(Some(Finishing)),
                    None,
                    None,
                    Some(Some(Cancelling)),
                    None,
                    Some(Some(Failed)),
                    None,
                ],
            ),
            (
                Synced,
                [
                    None, // Synced has every byte copied: 1 MiB is a step back
                    Some(Some(Finishing)),
                    None,
                    None,
                    Some(Some(Cancelling)),
                    None,
                    Some(Some(Failed)),
                    None,
                ],
            ),
            (
                Finishing,
                [
                    Some(Some(Finishing)),
                    Some(Some(Finishing)),
                    None, // not every block copied in this record
                    None,
                    Some(Some(Cancelling)),
                    None,
                    Some(Some(Failed)),
                    None,
                ],
            ),
            (Done, [None, None, None, Some(None), None, None, None, None]),
            (
                Cancelling,
                [
                    None,
                    None,
                    None,
                    None,
                    Some(Some(Cancelling)),
                    Some(None),
                    Some(Some(Cancelling)),
                    None,
                ],
            ),
            (
                Failed,
                [
                    None,
                    None,
                    None,
                    None,
                    Some(Some(Cancelling)),
                    None,
                    Some(Some(Failed)),
                    Some(Some(Copying)),
                ],
            ),
        ];
        for (phase, row) in table {
            let r = record(phase);
            for (event, want) in events().into_iter().zip(row) {
                let got = r.apply(event.clone());
                match (&got, want) {
                    (Err(e), None) => {
                        assert_eq!(e.phase, phase);
                        assert!(e.to_string().contains("web01-lm1"), "{e}");
                    }
                    (Ok(Next::Gone), Some(None)) => {}
                    (Ok(Next::Keep(n)), Some(Some(p))) => {
                        assert_eq!(n.phase, p, "{phase} {event:?}")
                    }
                    _ => panic!("{phase} + {event:?}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn copying_the_last_byte_of_every_disk_makes_it_synced() {
        let r = record(Phase::Copying);
        let r = kept(r.apply(Event::Copied {
            disk: 0,
            upto: 4 << 20,
        }));
        assert_eq!(r.phase, Phase::Copying, "disk 1 is not copied yet");
        let r = kept(r.apply(Event::Copied {
            disk: 1,
            upto: 2 << 20,
        }));
        assert_eq!(r.phase, Phase::Synced);
        assert_eq!(r.copied(), r.total());
    }

    #[test]
    fn progress_never_goes_back_or_past_the_end_or_to_a_missing_disk() {
        let r = kept(record(Phase::Copying).apply(Event::Copied {
            disk: 0,
            upto: 2 << 20,
        }));
        for (disk, upto) in [(0, 1 << 20), (0, 5 << 20), (2, 0)] {
            let e = r.apply(Event::Copied { disk, upto }).unwrap_err();
            assert_eq!(e.phase, Phase::Copying, "{e}");
        }
    }

    #[test]
    fn a_failure_resets_progress_and_a_retry_copies_from_the_start() {
        let r = kept(record(Phase::Synced).apply(Event::Fail("disk full".into())));
        assert_eq!(r.copied(), 0);
        assert_eq!(r.error.as_deref(), Some("disk full"));
        let e = r.apply(Event::Finish).unwrap_err();
        assert!(
            e.to_string().contains("disk full") && e.to_string().contains("--cancel"),
            "{e}"
        );
        let r = kept(r.apply(Event::Retry));
        assert_eq!(
            (r.phase, r.copied(), r.error.clone()),
            (Phase::Copying, 0, None)
        );
    }

    #[test]
    fn verified_needs_every_block_copied() {
        let mut r = record(Phase::Finishing);
        assert!(r.apply(Event::Verified).is_err());
        for d in &mut r.disks {
            d.copied = d.size;
        }
        assert_eq!(kept(r.apply(Event::Verified)).phase, Phase::Done);
    }

    #[test]
    fn a_relocation_of_empty_disks_starts_synced() {
        let r = Relocation::new(
            "m",
            crate::repo::SnapshotId::from_hex(&"cd".repeat(32)).unwrap(),
            PathBuf::from("/d"),
            vec![("z.img".into(), 0)],
            None,
            jiff::Timestamp::UNIX_EPOCH,
        );
        assert_eq!(r.phase, Phase::Synced);
    }

    /// A restart at every step of a whole relocation: the record as persisted after each event
    /// survives a JSON round trip and says what to do; carrying on from there reaches the end.
    #[test]
    fn restart_at_every_step() {
        let steps = [
            Event::Copied {
                disk: 0,
                upto: 1 << 20,
            },
            Event::Copied {
                disk: 0,
                upto: 4 << 20,
            },
            Event::Copied {
                disk: 1,
                upto: 2 << 20,
            },
            Event::Finish,
            Event::Verified,
            Event::Retired,
        ];
        let want = [
            Resume::Copy,
            Resume::Copy,
            Resume::Copy,
            Resume::Follow,
            Resume::Finish,
            Resume::Retire,
        ];
        let mut r = record(Phase::Copying);
        for (i, step) in steps.iter().enumerate() {
            let text = serde_json::to_string(&r).unwrap();
            let back: Relocation = serde_json::from_str(&text).unwrap();
            assert_eq!(back, r);
            assert_eq!(back.on_start(), want[i], "before step {i}");
            // A restarted copy goes on from the durable frontier, never behind it.
            if back.on_start() == Resume::Copy {
                assert_eq!(back.copied(), r.copied());
            }
            match back.apply(step.clone()).unwrap() {
                Next::Keep(n) => r = n,
                Next::Gone => assert_eq!(i, steps.len() - 1),
            }
        }
        // Cancelling at every phase it applies to, then a restart: clean up, then gone.
        for phase in ALL {
            let Ok(Next::Keep(c)) = record(phase).apply(Event::Cancel) else {
                assert_eq!(
                    phase,
                    Phase::Done,
                    "only a handed-over copy cannot be cancelled"
                );
                continue;
            };
            assert_eq!(c.on_start(), Resume::CleanUp);
            assert_eq!(c.error, None, "cancelling clears an earlier failure");
            assert_eq!(c.apply(Event::CleanedUp), Ok(Next::Gone));
        }
        assert_eq!(record(Phase::Failed).on_start(), Resume::Idle);
    }

    #[test]
    fn records_refuse_unknown_fields() {
        let mut v = serde_json::to_value(record(Phase::Copying)).unwrap();
        v["surprise"] = 1.into();
        assert!(serde_json::from_value::<Relocation>(v).is_err());
    }
}
