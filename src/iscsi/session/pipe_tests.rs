//! Sessions over in-memory pipes: clocks, stops, windows, writes, reads, task
//! management, rejects.

use std::time::Duration;

use super::super::fuzzing::{disk, Client, Harness, TestTargets, OPEN_TARGET};
use super::*;

fn targets() -> Arc<TestTargets> {
    Arc::new(TestTargets::new(
        disk(4 << 20, 0x5a, false),
        disk(64 << 10, 0xa5, true),
        disk(64 << 10, 0, false),
    ))
}

type Task = tokio::task::JoinHandle<Res<()>>;

/// A session logged in to the open target.
async fn session() -> (Client, Task, Arc<TestTargets>) {
    let t = targets();
    let (mut c, task) = Client::connect(t.clone(), CancellationToken::new());
    c.login(Some(OPEN_TARGET)).await;
    (c, task, t)
}

fn op(h: &[u8; 48]) -> u8 {
    h[0] & 0x3f
}

fn field(h: &[u8; 48], at: usize) -> u32 {
    u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
}

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x2a;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

async fn time_to_end(task: Task) -> (Duration, Res<()>) {
    let t = tokio::time::Instant::now();
    let r = task.await.unwrap();
    (t.elapsed(), r)
}

fn about(d: Duration, want: Duration) -> bool {
    d >= want && d < want + Duration::from_secs(1)
}

/// The clocks, on a paused clock: a login that never comes is cut at LOGIN_TIME; a
/// session with nothing asked at IDLE_CLOSE, one pinged every 5 min is not; a PDU half
/// sent and a write whose data never comes are cut at STALL.
#[tokio::test(start_paused = true)]
async fn a_silent_login_an_idle_session_and_a_stalled_pdu_are_closed_in_time() {
    use super::super::server::LOGIN_TIME;
    let (_c, task) = Client::connect(targets(), CancellationToken::new());
    let (took, r) = time_to_end(task).await;
    assert!(about(took, LOGIN_TIME), "{took:?} {r:?}");

    let (mut c, task, _) = session().await;
    for i in 0..3 {
        tokio::time::sleep(Duration::from_secs(5 * 60)).await;
        c.send(&Harness::nop(i, 0, b"")).await;
        let (h, _) = c.recv().await.unwrap();
        assert_eq!(op(&h), pdu::NOP_IN);
    }
    let (took, r) = time_to_end(task).await;
    assert!(about(took, IDLE_CLOSE), "{took:?} {r:?}");

    let (mut c, task, _) = session().await;
    c.send(&Harness::nop(1, 0, b"")[..20]).await;
    let (took, r) = time_to_end(task).await;
    assert!(about(took, STALL), "{took:?} {r:?}");

    // A write of 64 KiB with 512 bytes along and nothing after: the R2T goes out, then
    // nothing comes.
    let (mut c, task, t) = session().await;
    c.send(&Harness::write(
        1,
        0,
        0,
        &write10(0, 128),
        65536,
        &[1; 512],
        true,
    ))
    .await;
    let (h, _) = c.recv().await.unwrap();
    assert_eq!(op(&h), pdu::R2T);
    let (took, r) = time_to_end(task).await;
    assert!(about(took, STALL), "{took:?} {r:?}");
    assert!(t.rw.lock()[..65536].iter().all(|b| *b == 0x5a));
}

/// A disk whose reads take 10 s.
struct SlowDisk(Arc<super::super::fuzzing::MemDisk>);

#[async_trait::async_trait]
impl crate::block::BlockDevice for SlowDisk {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    async fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<crate::block::Pieces, crate::block::BlockError> {
        tokio::time::sleep(Duration::from_secs(10)).await;
        self.0.read(offset, len).await
    }
    async fn write(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), crate::block::BlockError> {
        self.0.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), crate::block::BlockError> {
        Ok(())
    }
}

struct Slow;

impl Targets for Slow {
    fn list(&self, _: IpAddr) -> Vec<String> {
        vec![OPEN_TARGET.into()]
    }
    fn open(&self, _: &str, _: IpAddr) -> Option<super::super::server::Target> {
        let lun = Lun {
            dev: Arc::new(SlowDisk(disk(1 << 20, 0x77, false))),
            name: "slow/disk".into(),
            atomic: Arc::new(tokio::sync::RwLock::new(())),
        };
        Some(super::super::server::Target {
            name: OPEN_TARGET.into(),
            luns: vec![(0, Arc::new(lun))],
            chap: None,
        })
    }
}

/// A graceful stop with a read in flight: the read is answered (after its 10 s), then
/// the connection closes; a logout waits for it the same way.
#[tokio::test(start_paused = true)]
async fn a_stop_and_a_logout_answer_what_is_in_flight_first() {
    let cancel = CancellationToken::new();
    let (mut c, task) = Client::connect(Arc::new(Slow), cancel.clone());
    c.login(Some(OPEN_TARGET)).await;
    c.send(&Harness::read(1, 0, 0, &read10(0, 1), 512)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    cancel.cancel();
    let (h, d) = c.recv().await.unwrap();
    assert_eq!(
        (op(&h), h[1] & pdu::STATUS, d.len()),
        (pdu::DATA_IN, pdu::STATUS, 512)
    );
    assert!(d.iter().all(|b| *b == 0x77));
    assert!(c.recv().await.is_none(), "then closed");
    let (took, r) = time_to_end(task).await;
    assert!(took < Duration::from_secs(1) && r.is_ok(), "{took:?} {r:?}");

    let (mut c, _task) = Client::connect(Arc::new(Slow), CancellationToken::new());
    c.login(Some(OPEN_TARGET)).await;
    c.send(&Harness::read(1, 0, 0, &read10(0, 1), 512)).await;
    c.send(&Harness::logout(2, 1)).await;
    let (h, _) = c.recv().await.unwrap();
    assert_eq!(op(&h), pdu::DATA_IN);
    let (h, _) = c.recv().await.unwrap();
    assert_eq!((op(&h), h[2]), (pdu::LOGOUT_RESPONSE, 0));
    assert!(c.recv().await.is_none());
}

/// An initiator that asks and never takes its replies: cut STALL after the first reply
/// that cannot be written.
#[tokio::test(start_paused = true)]
async fn an_initiator_that_takes_no_reply_is_cut_at_stall() {
    let (mut c, task, _) = session().await;
    for i in 0..10 {
        c.send(&Harness::nop(i, 0, &[7; 65536])).await;
    }
    let (took, r) = time_to_end(task).await;
    assert!(about(took, STALL), "{took:?} {r:?}");
    assert!(r.unwrap_err().contains("did not take"));
}

/// A stop ends a login at once, and a session with nothing in flight at once.
#[tokio::test(start_paused = true)]
async fn a_stop_ends_a_login_and_an_idle_session_at_once() {
    let cancel = CancellationToken::new();
    let (_c, task) = Client::connect(targets(), cancel.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    cancel.cancel();
    let (took, r) = time_to_end(task).await;
    assert!(took < Duration::from_secs(1) && r.is_ok(), "{took:?} {r:?}");

    let cancel = CancellationToken::new();
    let (mut c, task) = Client::connect(targets(), cancel.clone());
    c.login(Some(OPEN_TARGET)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    cancel.cancel();
    let (took, r) = time_to_end(task).await;
    assert!(took < Duration::from_secs(1) && r.is_ok(), "{took:?} {r:?}");
    assert!(c.recv().await.is_none(), "closed");
}

/// A data segment announced over our MaxRecvDataSegmentLength ends the connection
/// before anything is read or allocated.
#[tokio::test]
async fn an_oversize_data_segment_closes_the_connection() {
    let (mut c, task, _) = session().await;
    let mut nop = Harness::nop(1, 0, b"");
    nop[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    c.send(&nop).await;
    let r = task.await.unwrap();
    assert!(r.unwrap_err().contains("announces"));
}

/// A write in three parts, as Linux sends one with InitialR2T=No: immediate data,
/// unsolicited Data-Out up to FirstBurstLength, then R2Ts of at most MaxBurstLength.
#[tokio::test]
async fn writes_gather_immediate_unsolicited_and_solicited_data() {
    let (mut c, _task, _) = session().await;
    let len = 1000 * 512u32;
    c.send(&Harness::write(
        5,
        0,
        0,
        &write10(0, 1000),
        len,
        &[1; 8192],
        false,
    ))
    .await;
    c.send(&Harness::data_out(
        5,
        RESERVED_TAG,
        0,
        0,
        8192,
        &[1; 32768],
        false,
    ))
    .await;
    c.send(&Harness::data_out(
        5,
        RESERVED_TAG,
        0,
        1,
        40960,
        &[1; 24576],
        true,
    ))
    .await;
    let mut at = 65536u32;
    let mut r2ts = 0;
    loop {
        let (h, _) = c.recv().await.unwrap();
        if op(&h) == pdu::SCSI_RESPONSE {
            assert_eq!(field(&h, pdu::ITT), 5);
            assert_eq!(field(&h, pdu::EXP_DATA_SN), r2ts, "ExpDataSN counts R2Ts");
            assert_eq!(h[1] & (pdu::OVERFLOW | pdu::UNDERFLOW), 0, "no residual");
            break;
        }
        assert_eq!(op(&h), pdu::R2T);
        assert_eq!(field(&h, pdu::DATA_SN), r2ts, "R2TSN");
        assert_eq!(field(&h, pdu::BUFFER_OFFSET), at);
        let want = (len - at).min(262144);
        assert_eq!(field(&h, pdu::DESIRED_LENGTH), want);
        let ttt = field(&h, pdu::TTT);
        let (mut off, mut sn) = (0, 0);
        while off < want {
            let n = (want - off).min(65536);
            c.send(&Harness::data_out(
                5,
                ttt,
                0,
                sn,
                at + off,
                &vec![1; n as usize],
                off + n == want,
            ))
            .await;
            off += n;
            sn += 1;
        }
        at += want;
        r2ts += 1;
    }
    assert_eq!(r2ts, 2);
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = write10(lba, blocks);
    c[0] = 0x28;
    c
}

/// A read of 300 KiB to an initiator that takes 64 KiB segments in bursts of 256 KiB:
/// five Data-In, DataSN 0 to 4 at their offsets, F at the end of each burst, the status
/// in the last (S) and no SCSI Response; a read the initiator expects less of is cut to
/// its length with an overflow residual.
#[tokio::test]
async fn reads_come_back_in_data_in_split_by_segment_and_burst() {
    let (mut c, _task, t) = session().await;
    t.rw.lock()[..300 << 10]
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = i as u8);
    c.send(&Harness::read(4, 0, 0, &read10(0, 600), 300 << 10))
        .await;
    let mut got = Vec::new();
    for sn in 0..5u32 {
        let (h, d) = c.recv().await.unwrap();
        assert_eq!((op(&h), field(&h, pdu::ITT)), (pdu::DATA_IN, 4));
        assert_eq!(field(&h, pdu::DATA_SN), sn);
        assert_eq!(field(&h, pdu::BUFFER_OFFSET) as usize, got.len());
        assert_eq!(
            d.len(),
            if sn < 4 {
                65536
            } else {
                300 * 1024 - 4 * 65536
            }
        );
        let fin = h[1] & pdu::FINAL != 0;
        assert_eq!(fin, sn == 3 || sn == 4, "F ends each burst");
        assert_eq!(h[1] & pdu::STATUS != 0, sn == 4, "status in the last");
        got.extend_from_slice(&d);
    }
    assert_eq!(&got[..], &t.rw.lock()[..300 << 10]);

    c.send(&Harness::read(5, 1, 0, &read10(0, 2), 512)).await;
    let (h, d) = c.recv().await.unwrap();
    assert_eq!(op(&h), pdu::DATA_IN);
    assert_eq!(d.len(), 512);
    assert_eq!(
        h[1] & (pdu::STATUS | pdu::OVERFLOW),
        pdu::STATUS | pdu::OVERFLOW
    );
    assert_eq!(field(&h, pdu::RESIDUAL), 512);
    // A read past the end: CHECK CONDITION with sense, no data.
    c.send(&Harness::read(6, 2, 0, &read10(u32::MAX - 1, 1), 512))
        .await;
    let (h, d) = c.recv().await.unwrap();
    assert_eq!((op(&h), h[3]), (pdu::SCSI_RESPONSE, scsi::CHECK_CONDITION));
    assert_eq!((d[1], d[2 + 2] & 0x0f, d[2 + 12]), (18, 0x05, 0x21));
}

/// Data-Out numbered out of turn, or not where it is due: rejected, its write dropped
/// unanswered and nothing written; the session goes on.
#[tokio::test]
async fn data_out_out_of_turn_is_rejected_and_its_write_dropped() {
    let (mut c, _task, t) = session().await;
    for (itt, sn, offset) in [(1u32, 1u32, 0u32), (2, 0, 512)] {
        c.send(&Harness::write(
            itt,
            itt - 1,
            0,
            &write10(0, 2),
            1024,
            &[],
            true,
        ))
        .await;
        let (h, _) = c.recv().await.unwrap();
        assert_eq!(op(&h), pdu::R2T);
        let ttt = field(&h, pdu::TTT);
        let bad = Harness::data_out(itt, ttt, 0, sn, offset, &[1; 512], false);
        c.send(&bad).await;
        let (h, d) = c.recv().await.unwrap();
        assert_eq!((op(&h), h[2]), (pdu::REJECT, pdu::REJECT_PROTOCOL_ERROR));
        assert_eq!(&d[..], &bad[..48]);
        // The rest of its data finds no write.
        c.send(&Harness::data_out(itt, ttt, 0, 1, 512, &[1; 512], true))
            .await;
    }
    c.send(&Harness::nop(9, 2, b"")).await;
    let (h, _) = c.recv().await.unwrap();
    assert_eq!((op(&h), field(&h, pdu::ITT)), (pdu::NOP_IN, 9));
    assert_eq!(
        field(&h, pdu::MAX_CMD_SN),
        2 + QUEUE_DEPTH - 1,
        "both places free"
    );
    assert!(t.rw.lock()[..1024].iter().all(|b| *b == 0x5a));
}

/// What RFC 7143 says is a Reject: an unknown opcode (the header sent back), a SNACK
/// at ErrorRecoveryLevel 0; the session goes on.
#[tokio::test]
async fn unknown_opcodes_and_snacks_are_rejected_and_the_session_goes_on() {
    let (mut c, _task, _) = session().await;
    let odd = Harness::raw(0x1c, 9, 0, b"");
    c.send(&odd).await;
    let (h, d) = c.recv().await.unwrap();
    assert_eq!((op(&h), h[2]), (pdu::REJECT, pdu::REJECT_NOT_SUPPORTED));
    assert_eq!(&d[..], &odd[..48]);
    c.send(&Harness::raw(pdu::SNACK, 9, 0, b"")).await;
    let (h, _) = c.recv().await.unwrap();
    assert_eq!((op(&h), h[2]), (pdu::REJECT, pdu::REJECT_SNACK));
    c.send(&Harness::nop(3, 0, b"x")).await;
    let (h, d) = c.recv().await.unwrap();
    assert_eq!(
        (op(&h), field(&h, pdu::ITT), &d[..]),
        (pdu::NOP_IN, 3, &b"x"[..])
    );
}

/// Task management answers and the session goes on: ABORT TASK of a write still
/// gathering (its later data dropped, nothing written), of a task that does not exist,
/// LUN RESET of a LUN that does not exist and of one that does.
#[tokio::test]
async fn task_management_is_answered_without_breaking_the_session() {
    let (mut c, _task, t) = session().await;
    c.send(&Harness::write(
        7,
        0,
        0,
        &write10(0, 128),
        65536,
        &[1; 512],
        true,
    ))
    .await;
    let (h, _) = c.recv().await.unwrap();
    assert_eq!(op(&h), pdu::R2T);
    let ttt = field(&h, pdu::TTT);
    let tmf = |itt, f, lun, r| Harness::task_mgmt(itt, 1, f, lun, r);
    c.send(&tmf(8, TMF_ABORT_TASK, 0, 7)).await;
    let (h, _) = c.recv().await.unwrap();
    assert_eq!(
        (op(&h), h[2], field(&h, pdu::ITT)),
        (pdu::TASK_MGMT_RESPONSE, TMF_COMPLETE, 8)
    );
    c.send(&Harness::data_out(7, ttt, 0, 0, 512, &[1; 65024], true))
        .await;
    c.send(&tmf(9, TMF_ABORT_TASK, 0, 77)).await;
    let (h, _) = c.recv().await.unwrap();
    assert_eq!((op(&h), h[2]), (pdu::TASK_MGMT_RESPONSE, TMF_NO_TASK));
    c.send(&tmf(10, TMF_LUN_RESET, 5, 0)).await;
    let (h, _) = c.recv().await.unwrap();
    assert_eq!(h[2], TMF_NO_LUN);
    c.send(&tmf(11, TMF_LUN_RESET, 0, 0)).await;
    let (h, _) = c.recv().await.unwrap();
    assert_eq!(h[2], TMF_COMPLETE);
    c.send(&tmf(12, 14, 0, 0)).await;
    let (h, _) = c.recv().await.unwrap();
    assert_eq!(h[2], TMF_NOT_SUPPORTED);
    // A task whose status went out before the abort came does not exist any more,
    // whether or not the session has seen it end.
    c.send(&Harness::read(20, 1, 0, &read10(0, 1), 512)).await;
    let (h, _) = c.recv().await.unwrap();
    assert_eq!(h[1] & pdu::STATUS, pdu::STATUS);
    c.send(&tmf(21, TMF_ABORT_TASK, 0, 20)).await;
    let (h, _) = c.recv().await.unwrap();
    assert_eq!((op(&h), h[2]), (pdu::TASK_MGMT_RESPONSE, TMF_NO_TASK));
    // The aborted write's place in the window is free again: CmdSN 2 is next.
    c.send(&Harness::nop(13, 2, b"")).await;
    let (h, _) = c.recv().await.unwrap();
    assert_eq!(op(&h), pdu::NOP_IN);
    assert_eq!(field(&h, pdu::EXP_CMD_SN), 2);
    assert_eq!(field(&h, pdu::MAX_CMD_SN), QUEUE_DEPTH + 1);
    assert!(t.rw.lock()[..65536].iter().all(|b| *b == 0x5a));
}

/// Writes the target will not take: longer than any command may move (refused before a
/// byte is asked for), and one whose data is shorter than its CDB says (overflow:
/// nothing written); a longer one is an underflow.
#[tokio::test]
async fn writes_too_long_or_short_of_their_cdb_get_residuals() {
    let (mut c, _task, t) = session().await;
    let mut huge = [0u8; 16];
    huge[0] = 0x8a;
    huge[10..14].copy_from_slice(&(1u32 << 20).to_be_bytes());
    c.send(&Harness::write(
        1,
        0,
        0,
        &huge,
        WRITE_LIMIT + 512,
        &[],
        true,
    ))
    .await;
    let (h, d) = c.recv().await.unwrap();
    assert_eq!((op(&h), h[3]), (pdu::SCSI_RESPONSE, scsi::CHECK_CONDITION));
    assert_eq!((d[2 + 2] & 0x0f, d[2 + 12]), (0x05, 0x24));

    c.send(&Harness::write(
        2,
        1,
        0,
        &write10(0, 2),
        512,
        &[9; 512],
        true,
    ))
    .await;
    // Two blocks by the CDB, one sent: the block that came is written, GOOD, with an
    // overflow residual of the block that did not.
    let (h, _) = c.recv().await.unwrap();
    assert_eq!((op(&h), h[3]), (pdu::SCSI_RESPONSE, scsi::GOOD));
    assert_eq!(h[1] & pdu::OVERFLOW, pdu::OVERFLOW);
    assert_eq!(field(&h, pdu::RESIDUAL), 512);
    assert!(t.rw.lock()[..512].iter().all(|b| *b == 9));
    assert!(t.rw.lock()[512..1024].iter().all(|b| *b == 0x5a));

    c.send(&Harness::write(
        3,
        2,
        0,
        &write10(0, 1),
        1024,
        &[9; 1024],
        true,
    ))
    .await;
    let (h, _) = c.recv().await.unwrap();
    assert_eq!(op(&h), pdu::SCSI_RESPONSE);
    assert_eq!(h[1] & pdu::UNDERFLOW, pdu::UNDERFLOW);
    assert_eq!(field(&h, pdu::RESIDUAL), 512);
}

/// CmdSN: an old one is dropped unanswered; one beyond ExpCmdSN (a gap one connection
/// can never fill) ends the connection.
#[tokio::test]
async fn an_old_cmd_sn_is_dropped_and_a_gap_ends_the_connection() {
    let (mut c, task, _) = session().await;
    let mut nop = Harness::nop(1, 0, b"");
    nop[0] &= !pdu::IMMEDIATE;
    c.send(&nop).await;
    let (h, _) = c.recv().await.unwrap();
    assert_eq!(field(&h, pdu::EXP_CMD_SN), 1);
    c.send(&nop).await; // CmdSN 0 again
    let mut later = Harness::nop(2, 1, b"");
    later[0] &= !pdu::IMMEDIATE;
    c.send(&later).await;
    let (h, _) = c.recv().await.unwrap();
    assert_eq!(field(&h, pdu::ITT), 2, "the duplicate got no answer");
    let mut gap = Harness::nop(3, 5, b"");
    gap[0] &= !pdu::IMMEDIATE;
    c.send(&gap).await;
    assert!(task.await.unwrap().unwrap_err().contains("CmdSN"));
}
