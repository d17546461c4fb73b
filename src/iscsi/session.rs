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

use bytes::Bytes;
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
        let write = async {
            wr.write_all(&o.bhs.0).await?;
            wr.write_all(&o.data).await?;
            wr.write_all(&[0u8; 3][..pdu::padding(o.data.len())])
                .await?;
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
                data: Bytes::new(),
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
                tracing::debug!(error = %e, "iscsi: bad text");
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
        let (out, residual) = match (verdict, need) {
            (Some(v), _) => (v, Residual::None),
            (None, Some(n)) if n > data.len() as u64 => (
                // The write's data is shorter than its CDB says: nothing is written.
                Outcome {
                    status: scsi::CHECK_CONDITION,
                    sense: Some(INVALID_FIELD_IN_IU),
                    data: Bytes::new(),
                },
                Residual::of(cmd.edtl, n),
            ),
            (None, Some(n)) => {
                let out = scsi::execute(lun.as_deref(), &luns, &cdb, &data[..n as usize]).await;
                (out, Residual::of(cmd.edtl, n))
            }
            (None, None) => {
                let out = scsi::execute(lun.as_deref(), &luns, &cdb, &data).await;
                let moved = out.data.len() as u64;
                (out, Residual::of(cmd.edtl, moved))
            }
        };
        drop(data);
        let data_in = out.data.slice(..out.data.len().min(cmd.edtl as usize));
        let collapse = out.status == scsi::GOOD && out.sense.is_none() && !data_in.is_empty();
        let seg = self.params.initiator_max_recv.max(512) as usize;
        let burst = self.params.max_burst.max(512) as usize;
        let mut offset = 0usize;
        let mut data_sn = 0u32;
        while offset < data_in.len() {
            let burst_end = (offset / burst + 1) * burst;
            let end = (offset + seg).min(burst_end).min(data_in.len());
            let last = end == data_in.len();
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
                data: data_in.slice(offset..end),
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

#[cfg(test)]
mod pipe_tests {
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
        async fn read(&self, offset: u64, len: u32) -> Result<Bytes, crate::block::BlockError> {
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
    async fn writes_too_long_or_short_of_their_cdb_are_refused_with_residuals() {
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
        let (h, d) = c.recv().await.unwrap();
        assert_eq!((op(&h), h[3]), (pdu::SCSI_RESPONSE, scsi::CHECK_CONDITION));
        assert_eq!(h[1] & pdu::OVERFLOW, pdu::OVERFLOW);
        assert_eq!(field(&h, pdu::RESIDUAL), 512);
        assert_eq!((d[2 + 12], d[2 + 13]), (0x0e, 0x03));
        assert!(t.rw.lock()[..1024].iter().all(|b| *b == 0x5a));

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
}
