//! The full feature phase of one session (RFC 7143 §4, §11): SCSI commands run as tasks,
//! their Data-In and responses written by one writer as they are done; writes gather their
//! data (immediate, unsolicited, then solicited by R2T) before they run; NOP, Text
//! (SendTargets), task management, Logout; Reject for what is malformed or unsupported.
//!
//! Owns: the CmdSN window ([`QUEUE_DEPTH`] commands; MaxCmdSN grows as commands finish),
//! StatSN (given out by the writer, in the order PDUs leave), the tasks of the session,
//! and the bytes buffered for writes ([`WRITE_BUDGET`]: R2Ts wait while it is spent).
//! Must not: parse a CDB beyond the length of the data a write brings (`super::scsi`
//! does the rest).
//!
//! Ordering: one reader (this loop) and one writer task; command tasks hand the writer their
//! PDUs in order through one channel, so a task's Data-In precede its status. The window
//! lives behind a std mutex held only to read or bump its numbers.
//! At ErrorRecoveryLevel 0 anything that breaks the protocol (a CmdSN gap, Data-Out out of
//! order or unasked for, a data segment over our MaxRecvDataSegmentLength) ends the
//! connection; the initiator logs in again.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::block::Pieces;
use bytes::{Buf, Bytes};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::login::{encode_text, parse_text, LoggedIn, Params, MAX_RECV_DATA, MAX_TEXT};
pub use super::login::{PORTAL_GROUP, QUEUE_DEPTH};
use super::pdu::{self, Bhs, DataOut, Residual, ScsiCommand, RESERVED_TAG};
use super::scsi::{self, Lun, Outcome, Sense};
use super::server::{read_rest, Conn, Res, Targets, IDLE_CLOSE, STALL};

/// The most a write may bring: the largest transfer, twice for COMPARE AND WRITE.
pub const WRITE_LIMIT: u32 = 2 * scsi::MAX_TRANSFER;
/// Bytes of write data one session holds at once before its R2Ts wait (one write larger
/// than this still goes, alone).
pub const WRITE_BUDGET: usize = 32 << 20;
/// Tasks of one session at once: the window, and as many immediate commands again.
const MAX_TASKS: usize = 2 * QUEUE_DEPTH as usize;
/// PDUs waiting for the writer.
const OUT_QUEUE: usize = 64;
/// The longest Text response (SendTargets of many targets), over all its PDUs.
const MAX_TEXT_RESPONSE: usize = 1 << 20;

/// Task management functions and responses (RFC 7143 §11.5).
const TMF_ABORT_TASK: u8 = 1;
const TMF_ABORT_TASK_SET: u8 = 2;
const TMF_CLEAR_ACA: u8 = 3;
const TMF_CLEAR_TASK_SET: u8 = 4;
const TMF_LUN_RESET: u8 = 5;
const TMF_TARGET_WARM_RESET: u8 = 6;
const TMF_TARGET_COLD_RESET: u8 = 7;
const TMF_TASK_REASSIGN: u8 = 8;
const TMF_COMPLETE: u8 = 0;
const TMF_NO_TASK: u8 = 1;
const TMF_NO_LUN: u8 = 2;
const TMF_NO_REASSIGN: u8 = 4;
const TMF_NOT_SUPPORTED: u8 = 5;

/// ILLEGAL REQUEST sense: INVALID FIELD IN CDB; INVALID FIELD IN COMMAND INFORMATION UNIT
/// (a write whose data is shorter than its CDB says).
const INVALID_FIELD_IN_CDB: Sense = Sense::new(0x05, 0x24, 0x00);
const INVALID_FIELD_IN_IU: Sense = Sense::new(0x05, 0x0e, 0x03);

/// The CmdSN window and StatSN.
struct Window {
    exp_cmd_sn: u32,
    stat_sn: u32,
    /// Non-immediate commands received and not yet answered.
    in_flight: u32,
}

impl Window {
    /// The window shrinks by each command in flight, so MaxCmdSN only grows.
    fn max_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn
            .wrapping_add(QUEUE_DEPTH)
            .wrapping_sub(1 + self.in_flight.min(QUEUE_DEPTH))
    }
}

type Shared = Arc<Mutex<Window>>;
/// A target's LUNs by number.
type Luns = Arc<[(u64, Arc<Lun>)]>;

fn lock(w: &Shared) -> MutexGuard<'_, Window> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// `a < b` in serial number arithmetic (RFC 1982).
fn serial_lt(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) > 0
}

/// What the writer puts into a PDU's StatSN field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seq {
    /// Nothing (Data-In without status): only ExpCmdSN and MaxCmdSN.
    Window,
    /// The next StatSN, not used up (R2T).
    Current,
    /// The next StatSN, used up (every response).
    Advance,
}

/// A PDU for the writer.
struct Out {
    bhs: Bhs,
    data: Bytes,
    seq: Seq,
}

/// The writer: stamps each PDU's sequence numbers as it leaves, gives up on an initiator
/// that does not take a PDU for [`STALL`].
async fn writer(
    wr: impl AsyncWrite + Unpin,
    mut rx: mpsc::Receiver<Out>,
    window: Shared,
) -> Res<()> {
    let mut wr = BufWriter::with_capacity(64 << 10, wr);
    while let Some(mut o) = rx.recv().await {
        {
            let mut w = lock(&window);
            match o.seq {
                Seq::Window => {}
                Seq::Current => o.bhs.set32(pdu::STAT_SN, w.stat_sn),
                Seq::Advance => {
                    o.bhs.set32(pdu::STAT_SN, w.stat_sn);
                    w.stat_sn = w.stat_sn.wrapping_add(1);
                }
            }
            o.bhs.set32(pdu::EXP_CMD_SN, w.exp_cmd_sn);
            o.bhs.set32(pdu::MAX_CMD_SN, w.max_cmd_sn());
        }
        o.bhs.set_data_len(o.data.len());
        let more = !rx.is_empty();
        let pad = &[0u8; 3][..pdu::padding(o.data.len())];
        // Header, data and padding in one vectored write when they do not fit the buffer.
        let mut pdu = Buf::chain(&o.bhs.0[..], o.data).chain(pad);
        let write = async {
            wr.write_all_buf(&mut pdu).await?;
            if !more {
                wr.flush().await?;
            }
            Ok::<(), std::io::Error>(())
        };
        match tokio::time::timeout(STALL, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("the initiator did not take a reply for 60 s".into()),
        }
    }
    let _ = wr.shutdown().await;
    Ok(())
}

/// A write gathering its data.
struct Gather {
    cmd: ScsiCommand,
    cdb: Vec<u8>,
    buf: Vec<u8>,
    /// Unsolicited Data-Out may still come, up to `unsolicited_end`.
    unsolicited: bool,
    unsolicited_end: u32,
    /// The R2T outstanding: its tag and where its burst ends.
    r2t: Option<(u32, u32)>,
    r2ts: u32,
    /// The DataSN due next: Data-Out are numbered from 0 in each sequence (the unsolicited
    /// one, and each R2T's).
    data_sn: u32,
    /// Bytes of [`WRITE_BUDGET`] reserved (from its first R2T on).
    reserved: usize,
    /// It holds a place in the CmdSN window (it is not immediate).
    slot: bool,
}

enum State {
    Gathering(Box<Gather>),
    Running {
        aborted: Arc<AtomicBool>,
        /// Its status is on its way to the writer: too late to abort.
        answered: Arc<AtomicBool>,
        finished: CancellationToken,
        reserved: usize,
    },
}

struct Task {
    itt: u32,
    lun: [u8; 8],
    state: State,
}

/// A running task's tie to the session: frees its window place before its status goes
/// out (or when it ends without one), and tells the reader it ended.
struct TaskGuard {
    id: u64,
    window: Shared,
    slot: bool,
    done: mpsc::UnboundedSender<u64>,
    _finished: DropGuard,
}

impl TaskGuard {
    fn release(&mut self) {
        if std::mem::take(&mut self.slot) {
            let mut w = lock(&self.window);
            w.in_flight = w.in_flight.saturating_sub(1);
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.release();
        let _ = self.done.send(self.id);
    }
}

/// The session as the reader keeps it.
struct Session {
    tx: mpsc::Sender<Out>,
    window: Shared,
    params: Params,
    /// The target's name and LUNs; `None` in a discovery session.
    target: Option<(String, Luns)>,
    lun_numbers: Arc<[u64]>,
    targets: Arc<dyn Targets>,
    peer: IpAddr,
    local: SocketAddr,
    tasks: HashMap<u64, Task>,
    next_id: u64,
    /// Writes waiting for budget to send their first R2T, oldest first.
    r2t_queue: VecDeque<u64>,
    buffered: usize,
    next_ttt: u32,
    done_tx: mpsc::UnboundedSender<u64>,
    /// Text an initiator is sending over continued Text PDUs.
    text_in: Vec<u8>,
    /// The rest of a long Text response: its tag and bytes.
    text_out: Option<(u32, Bytes)>,
}

/// How the reader's loop ends.
enum End {
    /// The initiator closed, or logged out, or a stop: answer what is in flight, then close.
    Drain,
    /// Close now.
    Close(Res<()>),
}

/// Serves a session that logged in, until logout, a stop, an error or idleness.
pub(crate) async fn run(
    s: impl Conn,
    l: LoggedIn,
    peer: IpAddr,
    local: SocketAddr,
    targets: Arc<dyn Targets>,
    cancel: CancellationToken,
) -> Res<()> {
    let (mut rd, wr) = tokio::io::split(s);
    let window = Arc::new(Mutex::new(Window {
        exp_cmd_sn: l.exp_cmd_sn,
        stat_sn: l.stat_sn,
        in_flight: 0,
    }));
    let (tx, rx) = mpsc::channel::<Out>(OUT_QUEUE);
    // Set when the writer gives up: the connection ends then.
    let dead = CancellationToken::new();
    let writer_dead = dead.clone();
    let writer_window = window.clone();
    let writer = tokio::spawn(async move {
        let _dead = writer_dead.drop_guard();
        writer(wr, rx, writer_window).await
    });
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let target = l.target.map(|t| {
        let luns: Luns = t.luns.into();
        (t.name, luns)
    });
    let lun_numbers: Arc<[u64]> = target
        .as_ref()
        .map(|(_, l)| l.iter().map(|(n, _)| *n).collect())
        .unwrap_or_default();
    let mut sess = Session {
        tx,
        window,
        params: l.params,
        target,
        lun_numbers,
        targets,
        peer,
        local,
        tasks: HashMap::new(),
        next_id: 0,
        r2t_queue: VecDeque::new(),
        buffered: 0,
        next_ttt: 0,
        done_tx,
        text_in: Vec::new(),
        text_out: None,
    };
    let end = loop {
        let limit = if sess.tasks.is_empty() {
            Some(IDLE_CLOSE)
        } else if sess.waiting_for_initiator() {
            Some(STALL)
        } else {
            None
        };
        let mut first = [0u8; 1];
        let read = async {
            match limit {
                Some(d) => tokio::time::timeout(d, rd.read(&mut first)).await.ok(),
                None => Some(rd.read(&mut first).await),
            }
        };
        let got = tokio::select! {
            _ = cancel.cancelled() => break End::Drain,
            _ = dead.cancelled() => break End::Close(Ok(())),
            Some(id) = done_rx.recv() => {
                if let Err(e) = sess.finished(id).await {
                    break End::Close(Err(e));
                }
                continue;
            }
            r = read => r,
        };
        match got {
            None if sess.tasks.is_empty() => break End::Close(Err("idle".into())),
            None => break End::Close(Err("a write's data did not come for 60 s".into())),
            Some(Ok(0)) => break End::Drain,
            Some(Ok(_)) => {}
            Some(Err(e)) => break End::Close(Err(e.to_string())),
        }
        let p = match read_rest(&mut rd, first[0], MAX_RECV_DATA).await {
            Ok(p) => p,
            Err(e) => break End::Close(Err(e)),
        };
        match sess.pdu(p).await {
            Ok(None) => {}
            Ok(Some(end)) => break end,
            Err(e) => break End::Close(Err(e)),
        }
    };
    let result = match end {
        End::Drain => {
            sess.drain(&mut done_rx).await;
            Ok(())
        }
        End::Close(r) => r,
    };
    drop(sess);
    let written = writer.await.map_err(|e| e.to_string())?;
    result.and(written)
}

/// What a PDU asks of the CmdSN window.
enum Accept {
    Take,
    /// Outside the window (an old duplicate): dropped unanswered.
    Drop,
}

impl Session {
    async fn send(&self, bhs: Bhs, data: impl Into<Bytes>, seq: Seq) -> Res<()> {
        self.tx
            .send(Out {
                bhs,
                data: data.into(),
                seq,
            })
            .await
            .map_err(|_| "the writer is gone".to_string())
    }

    async fn reject(&self, reason: u8, rejected: &Bhs) -> Res<()> {
        tracing::debug!(reason, pdu = ?rejected, "iscsi: reject");
        self.send(pdu::reject(reason), rejected.0.to_vec(), Seq::Advance)
            .await
    }

    /// Checks a PDU's CmdSN against the window and takes it in; `slot`: it holds a place
    /// until it is answered (SCSI commands).
    fn accept(&self, bhs: &Bhs, slot: bool) -> Res<Accept> {
        if bhs.immediate() {
            return Ok(Accept::Take);
        }
        let sn = bhs.get32(pdu::CMD_SN);
        let mut w = lock(&self.window);
        if sn == w.exp_cmd_sn {
            if slot && w.in_flight >= QUEUE_DEPTH {
                // Beyond MaxCmdSN (the window is full): silently ignored.
                return Ok(Accept::Drop);
            }
            w.exp_cmd_sn = sn.wrapping_add(1);
            if slot {
                w.in_flight += 1;
            }
            return Ok(Accept::Take);
        }
        if serial_lt(w.exp_cmd_sn, sn) && !serial_lt(w.max_cmd_sn(), sn) {
            // One connection: a gap can never fill.
            return Err(format!("CmdSN {sn} while {} is due", w.exp_cmd_sn));
        }
        Ok(Accept::Drop)
    }

    fn waiting_for_initiator(&self) -> bool {
        self.tasks.values().any(|t| match &t.state {
            State::Gathering(g) => g.unsolicited || g.r2t.is_some(),
            State::Running { .. } => false,
        })
    }

    /// One PDU; `Some` ends the session.
    async fn pdu(&mut self, p: super::server::Pdu) -> Res<Option<End>> {
        let discovery = self.target.is_none();
        match p.bhs.opcode() {
            pdu::NOP_OUT => self.nop(p).await?,
            pdu::SCSI_COMMAND if !discovery => self.command(p).await?,
            pdu::DATA_OUT if !discovery => self.data_out(p).await?,
            pdu::TASK_MGMT if !discovery => return self.task_mgmt(p).await,
            pdu::TEXT => self.text(p).await?,
            pdu::LOGOUT => return self.logout(p).await,
            pdu::SNACK => self.reject(pdu::REJECT_SNACK, &p.bhs).await?,
            pdu::SCSI_COMMAND | pdu::DATA_OUT | pdu::TASK_MGMT | pdu::LOGIN => {
                self.reject(pdu::REJECT_PROTOCOL_ERROR, &p.bhs).await?
            }
            _ => self.reject(pdu::REJECT_NOT_SUPPORTED, &p.bhs).await?,
        }
        Ok(None)
    }

    async fn nop(&mut self, p: super::server::Pdu) -> Res<()> {
        let itt = p.bhs.itt();
        if itt == RESERVED_TAG {
            // An answer to a NOP-In of ours, or a ping that wants none.
            return Ok(());
        }
        if let Accept::Drop = self.accept(&p.bhs, false)? {
            return Ok(());
        }
        let mut data = p.data;
        data.truncate(self.params.initiator_max_recv as usize);
        self.send(pdu::nop_in(p.bhs.lun(), itt), data, Seq::Advance)
            .await
    }

    /// A SCSI Command: run it now, or gather a write's data first.
    async fn command(&mut self, p: super::server::Pdu) -> Res<()> {
        let cmd = ScsiCommand::parse(&p.bhs);
        let Some(cdb) = cdb(&cmd, &p.ahs) else {
            return self.reject(pdu::REJECT_INVALID_FIELD, &p.bhs).await;
        };
        if self.tasks.len() >= MAX_TASKS {
            return Err(format!("more than {MAX_TASKS} tasks"));
        }
        if let Accept::Drop = self.accept(&p.bhs, true)? {
            return Ok(());
        }
        let slot = !cmd.immediate;
        let data = p.data;
        if !cmd.write || cmd.edtl == 0 {
            // Immediate data with no write to take it is dropped.
            self.spawn(cmd, cdb, Vec::new(), slot, 0, 0, None);
            return Ok(());
        }
        if self
            .tasks
            .values()
            .any(|t| t.itt == cmd.itt && matches!(t.state, State::Gathering(_)))
        {
            return Err(format!("task tag {:#x} used twice", cmd.itt));
        }
        if cmd.edtl > WRITE_LIMIT {
            // Never gathered: refused at once; the data the initiator may still send
            // unasked for finds no task and is dropped.
            let refuse = Outcome {
                status: scsi::CHECK_CONDITION,
                sense: Some(INVALID_FIELD_IN_CDB),
                data: Pieces::default(),
            };
            self.spawn(cmd, cdb, Vec::new(), slot, 0, 0, Some(refuse));
            return Ok(());
        }
        if data.len() > cmd.edtl as usize
            || data.len() > self.params.first_burst as usize
            || (!data.is_empty() && !self.params.immediate_data)
        {
            return Err(format!(
                "{} bytes of immediate data for a write of {}",
                data.len(),
                cmd.edtl
            ));
        }
        let unsolicited = !cmd.fin;
        if unsolicited && self.params.initial_r2t {
            return Err("unsolicited data with InitialR2T=Yes".into());
        }
        let g = Box::new(Gather {
            cmd,
            cdb,
            buf: data,
            unsolicited,
            unsolicited_end: self.params.first_burst.min(cmd.edtl),
            r2t: None,
            r2ts: 0,
            data_sn: 0,
            reserved: 0,
            slot,
        });
        let id = self.next_id();
        self.tasks.insert(
            id,
            Task {
                itt: cmd.itt,
                lun: cmd.lun,
                state: State::Gathering(g),
            },
        );
        self.progress(id).await
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// A write's next step after data came: run it when whole, else ask for more.
    async fn progress(&mut self, id: u64) -> Res<()> {
        let Some(Task {
            state: State::Gathering(g),
            ..
        }) = self.tasks.get_mut(&id)
        else {
            return Ok(());
        };
        if g.buf.len() == g.cmd.edtl as usize {
            let Some(Task {
                state: State::Gathering(g),
                ..
            }) = self.tasks.remove(&id)
            else {
                return Ok(());
            };
            let g = *g;
            self.spawn(g.cmd, g.cdb, g.buf, g.slot, g.reserved, g.r2ts, None);
            return Ok(());
        }
        if g.unsolicited || g.r2t.is_some() {
            return Ok(());
        }
        if g.reserved > 0 {
            let o = self.r2t(id);
            return match o {
                Some(o) => self
                    .tx
                    .send(o)
                    .await
                    .map_err(|_| "the writer is gone".into()),
                None => Ok(()),
            };
        }
        if !self.r2t_queue.contains(&id) {
            self.r2t_queue.push_back(id);
        }
        self.pump().await
    }

    /// Sends the first R2T of queued writes while the budget allows.
    async fn pump(&mut self) -> Res<()> {
        while let Some(&id) = self.r2t_queue.front() {
            let Some(Task {
                state: State::Gathering(g),
                ..
            }) = self.tasks.get_mut(&id)
            else {
                self.r2t_queue.pop_front();
                continue;
            };
            let need = g.cmd.edtl as usize;
            if self.buffered > 0 && self.buffered + need > WRITE_BUDGET {
                return Ok(());
            }
            self.r2t_queue.pop_front();
            self.buffered += need;
            g.reserved = need;
            // Bounded by WRITE_LIMIT, and the initiator sends it as asked.
            g.buf.reserve_exact(need.saturating_sub(g.buf.len()));
            if let Some(o) = self.r2t(id) {
                self.tx
                    .send(o)
                    .await
                    .map_err(|_| "the writer is gone".to_string())?;
            }
        }
        Ok(())
    }

    /// The next R2T of write `id`: the next burst of at most MaxBurstLength.
    fn r2t(&mut self, id: u64) -> Option<Out> {
        let ttt = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1) % RESERVED_TAG;
        let max_burst = self.params.max_burst;
        let Some(Task {
            state: State::Gathering(g),
            ..
        }) = self.tasks.get_mut(&id)
        else {
            return None;
        };
        let offset = g.buf.len() as u32;
        let len = (g.cmd.edtl - offset).min(max_burst);
        g.r2t = Some((ttt, offset + len));
        g.data_sn = 0;
        let sn = g.r2ts;
        g.r2ts += 1;
        Some(Out {
            bhs: pdu::r2t(g.cmd.lun, g.cmd.itt, ttt, sn, offset, len),
            data: Bytes::new(),
            seq: Seq::Current,
        })
    }

    /// A Data-Out: appended to its write if it is the one due (in order, numbered in turn,
    /// inside its burst). One that is not is rejected (protocol error) and its write
    /// dropped unanswered: the initiator fails that command on the Reject, and the session
    /// goes on (libiscsi's iSCSIdatasn test expects this rather than a dropped connection).
    async fn data_out(&mut self, p: super::server::Pdu) -> Res<()> {
        let d = DataOut::parse(&p.bhs);
        let found = self
            .tasks
            .iter_mut()
            .find_map(|(id, t)| match &mut t.state {
                State::Gathering(g) if t.itt == d.itt => Some((*id, g)),
                _ => None,
            });
        let Some((id, g)) = found else {
            // Data for a task aborted or refused: dropped.
            return Ok(());
        };
        let end = g.buf.len() + p.data.len();
        let fault = if d.offset as usize != g.buf.len() {
            Some(format!("at {} where {} is due", d.offset, g.buf.len()))
        } else if d.data_sn != g.data_sn {
            Some(format!("DataSN {} where {} is due", d.data_sn, g.data_sn))
        } else if d.ttt == RESERVED_TAG {
            (!g.unsolicited || end > g.unsolicited_end as usize)
                .then(|| "unsolicited beyond FirstBurstLength".to_string())
        } else {
            match g.r2t {
                Some((ttt, burst_end)) if ttt == d.ttt && end <= burst_end as usize => None,
                _ => Some(format!("for no R2T (tag {:#x})", d.ttt)),
            }
        };
        if let Some(why) = fault {
            tracing::info!(itt = d.itt, "iscsi: Data-Out {why}: the write is dropped");
            self.forget(id);
            self.r2t_queue.retain(|q| *q != id);
            return self.reject(pdu::REJECT_PROTOCOL_ERROR, &p.bhs).await;
        }
        g.data_sn = g.data_sn.wrapping_add(1);
        g.buf.extend_from_slice(&p.data);
        if d.ttt == RESERVED_TAG {
            if d.fin || end == g.unsolicited_end as usize {
                g.unsolicited = false;
            }
        } else if g
            .r2t
            .is_some_and(|(_, burst_end)| end == burst_end as usize)
        {
            g.r2t = None;
        }
        self.progress(id).await
    }

    /// Starts a command's task; `verdict` answers it without running it.
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &mut self,
        cmd: ScsiCommand,
        cdb: Vec<u8>,
        data: Vec<u8>,
        slot: bool,
        reserved: usize,
        r2ts: u32,
        verdict: Option<Outcome>,
    ) {
        let id = self.next_id();
        let aborted = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicBool::new(false));
        let finished = CancellationToken::new();
        let guard = TaskGuard {
            id,
            window: self.window.clone(),
            slot,
            done: self.done_tx.clone(),
            _finished: finished.clone().drop_guard(),
        };
        let lun = scsi::decode_lun(&cmd.lun).and_then(|n| {
            self.target
                .as_ref()
                .and_then(|(_, luns)| luns.iter().find(|(m, _)| *m == n))
                .map(|(_, l)| l.clone())
        });
        let ctx = TaskCtx {
            tx: self.tx.clone(),
            guard,
            aborted: aborted.clone(),
            answered: answered.clone(),
            params: self.params,
        };
        let luns = self.lun_numbers.clone();
        tokio::spawn(async move {
            let job = Job {
                cmd,
                cdb,
                data,
                r2ts,
            };
            ctx.run(job, lun, luns, verdict).await
        });
        self.tasks.insert(
            id,
            Task {
                itt: cmd.itt,
                lun: cmd.lun,
                state: State::Running {
                    aborted,
                    answered,
                    finished,
                    reserved,
                },
            },
        );
    }

    /// A task ended: its budget comes back, and waiting writes may go on.
    async fn finished(&mut self, id: u64) -> Res<()> {
        if let Some(Task {
            state: State::Running { reserved, .. },
            ..
        }) = self.tasks.get(&id)
        {
            self.buffered = self.buffered.saturating_sub(*reserved);
            self.tasks.remove(&id);
        }
        self.pump().await
    }

    /// Drops a gathering write (no answer will come for it).
    fn forget(&mut self, id: u64) {
        if let Some(Task {
            state: State::Gathering(g),
            ..
        }) = self.tasks.remove(&id)
        {
            self.buffered = self.buffered.saturating_sub(g.reserved);
            if g.slot {
                let mut w = lock(&self.window);
                w.in_flight = w.in_flight.saturating_sub(1);
            }
        }
    }

    /// Aborts the tasks `which` picks: writes still gathering are dropped, running ones
    /// told to send nothing more; for those, when they have ended and whether they had
    /// answered already.
    fn abort(
        &mut self,
        which: impl Fn(&Task) -> bool,
    ) -> Vec<(CancellationToken, Arc<AtomicBool>)> {
        let picked: Vec<u64> = self
            .tasks
            .iter()
            .filter(|(_, t)| which(t))
            .map(|(id, _)| *id)
            .collect();
        let mut wait = Vec::new();
        for id in picked {
            match self.tasks.get(&id).map(|t| &t.state) {
                Some(State::Running {
                    aborted,
                    answered,
                    finished,
                    ..
                }) => {
                    aborted.store(true, Ordering::SeqCst);
                    wait.push((finished.clone(), answered.clone()));
                }
                Some(State::Gathering(_)) => self.forget(id),
                None => {}
            }
        }
        self.r2t_queue.retain(|id| self.tasks.contains_key(id));
        wait
    }

    async fn task_mgmt(&mut self, p: super::server::Pdu) -> Res<Option<End>> {
        let function = p.bhs.flags() & 0x7f;
        let itt = p.bhs.itt();
        if let Accept::Drop = self.accept(&p.bhs, false)? {
            return Ok(None);
        }
        let lun = p.bhs.lun();
        let known_lun = scsi::decode_lun(&lun).is_some_and(|n| self.lun_numbers.contains(&n));
        let (response, wait) = match function {
            TMF_ABORT_TASK => {
                let referenced = p.bhs.get32(pdu::TTT);
                if self.tasks.values().any(|t| t.itt == referenced) {
                    (TMF_COMPLETE, self.abort(|t| t.itt == referenced))
                } else {
                    (TMF_NO_TASK, Vec::new())
                }
            }
            TMF_ABORT_TASK_SET | TMF_CLEAR_TASK_SET | TMF_LUN_RESET if !known_lun => {
                (TMF_NO_LUN, Vec::new())
            }
            TMF_ABORT_TASK_SET | TMF_CLEAR_TASK_SET | TMF_LUN_RESET => {
                (TMF_COMPLETE, self.abort(|t| t.lun == lun))
            }
            TMF_TARGET_WARM_RESET | TMF_TARGET_COLD_RESET => (TMF_COMPLETE, self.abort(|_| true)),
            TMF_CLEAR_ACA => (TMF_COMPLETE, Vec::new()),
            TMF_TASK_REASSIGN => (TMF_NO_REASSIGN, Vec::new()),
            _ => (TMF_NOT_SUPPORTED, Vec::new()),
        };
        tracing::info!(function, response, "iscsi: task management");
        let reply = move |response| Out {
            bhs: pdu::task_mgmt_response(itt, response),
            data: Bytes::new(),
            seq: Seq::Advance,
        };
        if wait.is_empty() {
            self.tx
                .send(reply(response))
                .await
                .map_err(|_| "the writer is gone".to_string())?;
        } else {
            // Answered once the aborted tasks have ended, so nothing of theirs follows. A
            // task that had answered before the abort reached it completed: for ABORT TASK
            // that task "does not exist" (libiscsi's test counts on one or the other).
            let tx = self.tx.clone();
            let single = function == TMF_ABORT_TASK;
            tokio::spawn(async move {
                let mut all_answered = true;
                for (finished, answered) in wait {
                    finished.cancelled().await;
                    all_answered &= answered.load(Ordering::SeqCst);
                }
                let response = if single && all_answered {
                    TMF_NO_TASK
                } else {
                    response
                };
                let _ = tx.send(reply(response)).await;
            });
        }
        if function == TMF_TARGET_COLD_RESET {
            return Ok(Some(End::Drain));
        }
        Ok(None)
    }

    async fn text(&mut self, p: super::server::Pdu) -> Res<()> {
        let itt = p.bhs.itt();
        let ttt = p.bhs.get32(pdu::TTT);
        if let Accept::Drop = self.accept(&p.bhs, false)? {
            return Ok(());
        }
        // The initiator asks for the rest of a long response.
        if ttt != RESERVED_TAG && p.data.is_empty() {
            if let Some((tag, rest)) = self.text_out.take() {
                if tag == ttt {
                    return self.text_reply(itt, rest).await;
                }
            }
        }
        self.text_out = None;
        if self.text_in.len() + p.data.len() > MAX_TEXT {
            return Err(format!("text beyond {MAX_TEXT} bytes"));
        }
        self.text_in.extend_from_slice(&p.data);
        if p.bhs.flags() & pdu::CONTINUE != 0 {
            let ttt = self.next_tag();
            let mut b = pdu::text_response(itt, ttt, false);
            b.0[1] = 0;
            return self.send(b, Bytes::new(), Seq::Advance).await;
        }
        let text = std::mem::take(&mut self.text_in);
        let pairs = match parse_text(&text) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = ?e, "iscsi: bad text");
                return self.reject(pdu::REJECT_INVALID_FIELD, &p.bhs).await;
            }
        };
        let mut answers = Vec::new();
        for (k, v) in pairs {
            match k.as_str() {
                "SendTargets" => answers.extend(self.send_targets(&v)),
                "MaxRecvDataSegmentLength" => {
                    if let Some(a) = self.params.answer(&k, &v) {
                        answers.push((k, a));
                    }
                }
                _ => answers.push((k, "NotUnderstood".to_string())),
            }
        }
        let mut out = encode_text(&answers);
        out.truncate(MAX_TEXT_RESPONSE);
        self.text_reply(itt, out.into()).await
    }

    fn next_tag(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1) % RESERVED_TAG;
        t
    }

    /// Sends `text`, as much as the initiator takes in one PDU; the rest waits for its
    /// next (empty) Text Request.
    async fn text_reply(&mut self, itt: u32, text: Bytes) -> Res<()> {
        let max = self.params.initiator_max_recv as usize;
        if text.len() <= max {
            return self
                .send(
                    pdu::text_response(itt, RESERVED_TAG, false),
                    text,
                    Seq::Advance,
                )
                .await;
        }
        let ttt = self.next_tag();
        self.text_out = Some((ttt, text.slice(max..)));
        self.send(
            pdu::text_response(itt, ttt, true),
            text.slice(..max),
            Seq::Advance,
        )
        .await
    }

    /// SendTargets: `All` (discovery), a name, or nothing (this session's target).
    fn send_targets(&self, which: &str) -> Vec<(String, String)> {
        let names: Vec<String> = match (&self.target, which) {
            (None, "All") => self.targets.list(self.peer),
            (None, "") => Vec::new(),
            (None, name) => self
                .targets
                .list(self.peer)
                .into_iter()
                .filter(|n| n == name)
                .collect(),
            (Some((own, _)), "") => vec![own.clone()],
            (Some((own, _)), name) if name == own => vec![own.clone()],
            (Some(_), _) => Vec::new(),
        };
        let local = match self.local {
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::from((v4, v6.port())),
                None => self.local,
            },
            v4 => v4,
        };
        let address = format!("{local},{PORTAL_GROUP}");
        names
            .into_iter()
            .flat_map(|n| {
                [
                    ("TargetName".to_string(), n),
                    ("TargetAddress".to_string(), address.clone()),
                ]
            })
            .collect()
    }

    async fn logout(&mut self, p: super::server::Pdu) -> Res<Option<End>> {
        let itt = p.bhs.itt();
        if let Accept::Drop = self.accept(&p.bhs, false)? {
            return Ok(None);
        }
        let reason = p.bhs.flags() & 0x7f;
        if reason == 2 {
            // Removing a connection for recovery: not at ErrorRecoveryLevel 0.
            self.send(pdu::logout_response(itt, 2), Bytes::new(), Seq::Advance)
                .await?;
            return Ok(None);
        }
        Ok(Some(End::Close(self.close_with(itt).await)))
    }

    /// Logout: answers what is in flight, then the logout.
    async fn close_with(&mut self, itt: u32) -> Res<()> {
        let ids: Vec<u64> = self.tasks.keys().copied().collect();
        let mut wait = Vec::new();
        for id in ids {
            match self.tasks.get(&id).map(|t| &t.state) {
                Some(State::Running { finished, .. }) => wait.push(finished.clone()),
                Some(State::Gathering(_)) => self.forget(id),
                None => {}
            }
        }
        for t in wait {
            t.cancelled().await;
        }
        self.send(pdu::logout_response(itt, 0), Bytes::new(), Seq::Advance)
            .await
    }

    /// A graceful end: writes still gathering are dropped, running tasks answered.
    async fn drain(&mut self, done_rx: &mut mpsc::UnboundedReceiver<u64>) {
        let gathering: Vec<u64> = self
            .tasks
            .iter()
            .filter(|(_, t)| matches!(t.state, State::Gathering(_)))
            .map(|(id, _)| *id)
            .collect();
        for id in gathering {
            self.forget(id);
        }
        self.r2t_queue.clear();
        while !self.tasks.is_empty() {
            match done_rx.recv().await {
                Some(id) => {
                    self.tasks.remove(&id);
                }
                None => break,
            }
        }
    }
}

/// The CDB: 16 bytes in the header, more in an extended-CDB AHS.
fn cdb(cmd: &ScsiCommand, ahs: &[u8]) -> Option<Vec<u8>> {
    let mut cdb = cmd.cdb.to_vec();
    let mut rest = ahs;
    while rest.len() >= 4 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let kind = rest[2];
        let body = rest.get(4..4 + len.checked_sub(1)?)?;
        if kind == pdu::AHS_EXTENDED_CDB {
            cdb.extend_from_slice(body);
        }
        let padded = 4 + (len - 1) + pdu::padding(len - 1);
        rest = rest.get(padded.min(rest.len())..)?;
    }
    Some(cdb)
}

/// What a command task runs.
struct Job {
    cmd: ScsiCommand,
    cdb: Vec<u8>,
    data: Vec<u8>,
    r2ts: u32,
}

struct TaskCtx {
    tx: mpsc::Sender<Out>,
    guard: TaskGuard,
    aborted: Arc<AtomicBool>,
    answered: Arc<AtomicBool>,
    params: Params,
}

impl TaskCtx {
    /// Hands a PDU to the writer, unless the task was aborted.
    async fn send(&self, o: Out) -> bool {
        !self.aborted.load(Ordering::SeqCst) && self.tx.send(o).await.is_ok()
    }

    /// Hands the PDU with the status to the writer, unless the task was aborted.
    async fn send_status(&mut self, o: Out) -> bool {
        self.guard.release();
        let sent = self.send(o).await;
        self.answered.store(sent, Ordering::SeqCst);
        sent
    }

    /// Runs the command and sends its Data-In and status.
    async fn run(
        mut self,
        job: Job,
        lun: Option<Arc<Lun>>,
        luns: Arc<[u64]>,
        verdict: Option<Outcome>,
    ) {
        let Job {
            cmd,
            cdb,
            data,
            r2ts,
        } = job;
        let need = scsi::data_out_len(&cdb).filter(|n| *n > 0);
        let (mut out, residual) = match (verdict, need) {
            (Some(v), _) => (v, Residual::None),
            // The write's data is shorter than its CDB says: a plain WRITE writes the whole
            // blocks that came (FCP-4; libiscsi's residual tests), anything else is refused
            // with nothing written.
            (None, Some(n)) if n > data.len() as u64 => {
                let out = match scsi::shorten_write(&cdb, data.len() as u64) {
                    Some(short) => scsi::execute(lun.as_deref(), &luns, &short, &data).await,
                    None => Outcome {
                        status: scsi::CHECK_CONDITION,
                        sense: Some(INVALID_FIELD_IN_IU),
                        data: Pieces::default(),
                    },
                };
                (out, Residual::of(cmd.edtl, n))
            }
            // Every byte that came goes to the command: COMPARE AND WRITE refuses data that
            // is not exactly its own, the others take what they need.
            (None, Some(n)) => {
                let out = scsi::execute(lun.as_deref(), &luns, &cdb, &data).await;
                (out, Residual::of(cmd.edtl, n))
            }
            (None, None) => {
                let out = scsi::execute(lun.as_deref(), &luns, &cdb, &data).await;
                let moved = out.data.len() as u64;
                (out, Residual::of(cmd.edtl, moved))
            }
        };
        drop(data);
        let data_len = out.data.len().min(cmd.edtl as usize);
        let mut data_in = std::mem::take(&mut out.data);
        let collapse = out.status == scsi::GOOD && out.sense.is_none() && data_len > 0;
        let seg = self.params.initiator_max_recv.max(512) as usize;
        let burst = self.params.max_burst.max(512) as usize;
        let mut offset = 0usize;
        let mut data_sn = 0u32;
        while offset < data_len {
            let burst_end = (offset / burst + 1) * burst;
            let end = (offset + seg).min(burst_end).min(data_len);
            let last = end == data_len;
            let mut b = pdu::data_in(
                cmd.lun,
                cmd.itt,
                data_sn,
                offset as u32,
                end == burst_end || last,
            );
            let status = last && collapse;
            if status {
                b.0[1] |= pdu::STATUS | residual.flags();
                b.0[3] = out.status;
                b.set32(pdu::RESIDUAL, residual.count());
            }
            let o = Out {
                bhs: b,
                // A slice of the piece it lies in; gathered only across two.
                data: data_in.copy_to_bytes(end - offset),
                seq: if status { Seq::Advance } else { Seq::Window },
            };
            let sent = if status {
                self.send_status(o).await
            } else {
                self.send(o).await
            };
            if !sent {
                return;
            }
            data_sn += 1;
            offset = end;
        }
        if collapse {
            return;
        }
        let sense = out.sense.map(|s| {
            let mut v = vec![0u8, 18];
            v.extend_from_slice(&s.fixed());
            v
        });
        let exp_data_sn = if data_sn > 0 { data_sn } else { r2ts };
        let b = pdu::scsi_response(cmd.itt, out.status, residual, exp_data_sn);
        self.send_status(Out {
            bhs: b,
            data: sense.map(Bytes::from).unwrap_or_default(),
            seq: Seq::Advance,
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_shrinks_with_commands_in_flight_and_max_cmd_sn_never_falls() {
        let mut w = Window {
            exp_cmd_sn: 10,
            stat_sn: 0,
            in_flight: 0,
        };
        assert_eq!(w.max_cmd_sn(), 10 + QUEUE_DEPTH - 1);
        // A command arrives: ExpCmdSN moves on, the window end stays.
        w.exp_cmd_sn += 1;
        w.in_flight += 1;
        assert_eq!(w.max_cmd_sn(), 10 + QUEUE_DEPTH - 1);
        // It is answered: the end moves on.
        w.in_flight -= 1;
        assert_eq!(w.max_cmd_sn(), 11 + QUEUE_DEPTH - 1);
        // Full: MaxCmdSN = ExpCmdSN - 1.
        w.in_flight = QUEUE_DEPTH;
        assert_eq!(w.max_cmd_sn(), w.exp_cmd_sn - 1);
        let w = Window {
            exp_cmd_sn: u32::MAX,
            stat_sn: 0,
            in_flight: 0,
        };
        assert_eq!(w.max_cmd_sn(), QUEUE_DEPTH - 2, "wraps");
    }

    #[test]
    fn serial_numbers_compare_across_the_wrap() {
        assert!(serial_lt(1, 2));
        assert!(!serial_lt(2, 1));
        assert!(!serial_lt(5, 5));
        assert!(serial_lt(u32::MAX, 0));
        assert!(serial_lt(u32::MAX - 3, 4));
    }

    #[test]
    fn extended_cdbs_come_from_the_ahs_and_a_bad_ahs_is_refused() {
        let cmd = ScsiCommand {
            immediate: false,
            fin: true,
            read: true,
            write: false,
            lun: [0; 8],
            itt: 1,
            edtl: 0,
            cmd_sn: 0,
            cdb: [7; 16],
        };
        assert_eq!(cdb(&cmd, &[]).unwrap().len(), 16);
        // AHSLength 5: the reserved byte and 4 more CDB bytes.
        let ahs = [0, 5, 1, 0, 9, 9, 9, 9];
        let c = cdb(&cmd, &ahs).unwrap();
        assert_eq!(c.len(), 20);
        assert_eq!(&c[16..], &[9, 9, 9, 9]);
        assert!(
            cdb(&cmd, &[0, 200, 1, 0, 9, 9, 9, 9]).is_none(),
            "longer than it is"
        );
        assert!(cdb(&cmd, &[0, 0, 1, 0]).is_none(), "length 0");
    }
}

/// Sessions over in-memory pipes.
#[cfg(test)]
mod pipe_tests;
