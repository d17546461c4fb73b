//! The NFSv3 (RFC 1813) and MOUNT v3 programs: decode a call's arguments, run it on the
//! [`DatastoreFs`], encode the reply.
//!
//! Owns: argument decoding (by hand, with the bounded [`Reader`]: a length a client announces is
//! checked against the bytes that are there before anything is used), the reply layout
//! (results packed with `nfs3_types`), per-call authentication (AUTH_SYS unless AUTH_NONE is
//! allowed), weak cache consistency data, and the size limits of READDIR(PLUS) replies.
//! Must not: decide what a call means for the datastore (that is `crate::datastore`, through
//! `fs`), block, or panic on any input. A call's handles are resolved to nodes once, at the
//! start, and the nodes passed down. A READ's data is not copied: the reply carries the cache's
//! `Bytes` to the socket.

use std::net::{IpAddr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};
use nfs3_types::nfs3::{
    self as nfs, cookieverf3, entry3, entryplus3, fattr3, nfs_fh3, nfsstat3, nfstime3, wcc_attr,
    wcc_data, writeverf3, Nfs3Option,
};
use nfs3_types::xdr_codec::{List, Opaque, Pack};

use super::budget::{self, Budget, Taken};
use super::front::{self, Caller, Reply, RpcService, Transport};
use super::fs::{DatastoreFs, MAX_IO};
use super::rpc::{self, Accept, AuthStat, Call, Cred, Reader};
use crate::datastore::{CreateMode, Node, SetAttr, SetTime, Who, EXEC, MAX_NAME, READ, WRITE};

pub const NFS_PROGRAM: u32 = 100_003;
pub const MOUNT_PROGRAM: u32 = 100_005;
/// Longest path MNT takes (RFC 1813 MNTPATHLEN).
const MNT_PATH_LEN: usize = 1024;
/// Longest file handle a client may send (NFS3_FHSIZE).
const FH_MAX: usize = 64;

/// Answers one call record as the front does. `None`: nothing can be answered (not a call at
/// all).
pub async fn handle(fs: &DatastoreFs, record: &[u8], ip: IpAddr) -> Option<Reply> {
    let caller = Caller {
        peer: SocketAddr::new(ip, 0),
        local: None,
        transport: Transport::Tcp,
    };
    front::answer(fs, record, &caller, &Budget::new(usize::MAX)).await
}

/// NFS v3 and MOUNT v3 behind the RPC front.
impl RpcService for DatastoreFs {
    const NAME: &'static str = "nfs";

    async fn call<'a>(
        &'a self,
        call: Call<'a>,
        caller: &'a Caller,
        budget: &'a Budget,
    ) -> Option<Reply> {
        answer_call(self, call, caller.peer.ip(), budget).await
    }
}

/// Answers a call whose header the front decoded, a READ waiting for room in `budget` for its
/// data before it reads.
async fn answer_call(
    fs: &DatastoreFs,
    call: Call<'_>,
    ip: IpAddr,
    budget: &Budget,
) -> Option<Reply> {
    let xid = call.xid;
    let cred = match call.cred() {
        Ok(c) => c,
        Err(bad) => return rpc::reply_to_bad_call(&bad).map(Reply::new),
    };
    let authorized = match &cred {
        Cred::Sys { .. } => true,
        Cred::None => fs.allows_auth_none() || call.proc_ == 0,
        Cred::Other(_) => call.proc_ == 0,
    };
    let (accept, results) = match (call.prog, call.vers) {
        (NFS_PROGRAM | MOUNT_PROGRAM, _) if !authorized => {
            tracing::debug!(prog = call.prog, cred = ?cred, "call refused: AUTH_SYS required");
            return Some(Reply::new(rpc::auth_error(xid, AuthStat::TooWeak)));
        }
        (NFS_PROGRAM, 3) => match nfs_call(fs, &call, ip, &fs.who(&cred), budget).await {
            Some(r) => (Accept::Success, r),
            None => (Accept::GarbageArgs, Results::default()),
        },
        (NFS_PROGRAM, _) => (Accept::ProgMismatch { low: 3, high: 3 }, Results::default()),
        (MOUNT_PROGRAM, 3) => match mount_call(fs, &call, ip) {
            Some(r) => (Accept::Success, r),
            None => (Accept::GarbageArgs, Results::default()),
        },
        (MOUNT_PROGRAM, _) => (Accept::ProgMismatch { low: 3, high: 3 }, Results::default()),
        _ => (Accept::ProgUnavail, Results::default()),
    };
    let (accept, results) = match results.unavail {
        true => (Accept::ProcUnavail, Results::default()),
        false => (accept, results),
    };
    let mut head = BytesMut::with_capacity(32 + results.body.len());
    rpc::put_accepted(&mut head, xid, accept);
    head.extend_from_slice(&results.body);
    Some(Reply {
        head,
        data: results.data,
        taken: results.taken,
    })
}

/// A procedure's results: the encoded body and, for READ, its data.
#[derive(Default)]
struct Results {
    body: BytesMut,
    data: Bytes,
    /// The budget the data holds.
    taken: Option<Taken>,
    /// No such procedure.
    unavail: bool,
}

impl Results {
    fn packed<T: Pack>(value: &T) -> Results {
        let mut body = BytesMut::with_capacity(value.packed_size());
        pack(&mut body, value);
        Results {
            body,
            ..Results::default()
        }
    }

    fn unavail() -> Results {
        Results {
            unavail: true,
            ..Results::default()
        }
    }
}

fn pack<T: Pack>(out: &mut BytesMut, value: &T) {
    // Packing into memory cannot fail: every length here fits in 32 bits.
    let mut w = out.writer();
    if let Err(e) = value.pack(&mut w) {
        tracing::error!(error = %e, "cannot encode a reply");
    }
}

fn fh(fs: &DatastoreFs, node: &Node) -> nfs_fh3 {
    nfs_fh3 {
        data: Opaque::owned(fs.handle(node).to_vec()),
    }
}

/// A node's attributes as they are now (a call may have changed them since it resolved it).
fn post_op(fs: &DatastoreFs, node: Option<&Node>) -> nfs::post_op_attr {
    match node.and_then(|n| fs.attr_now(n)) {
        Some(a) => Nfs3Option::Some(a),
        None => Nfs3Option::None,
    }
}

fn pre_op(attr: Option<&fattr3>) -> nfs::pre_op_attr {
    match attr {
        Some(a) => Nfs3Option::Some(wcc_attr {
            size: a.size,
            mtime: a.mtime,
            ctime: a.ctime,
        }),
        None => Nfs3Option::None,
    }
}

/// Weak cache consistency data for `node`: `before` as read before the change, after as now.
fn wcc(fs: &DatastoreFs, node: Option<&Node>, before: Option<&fattr3>) -> wcc_data {
    wcc_data {
        before: pre_op(before),
        after: post_op(fs, node),
    }
}

fn status(out: &mut BytesMut, s: nfsstat3) {
    out.put_u32(s as u32);
}

/// An error reply whose failure body is one `post_op_attr`.
fn fail_attr(fs: &DatastoreFs, s: nfsstat3, node: Option<&Node>) -> Results {
    let mut body = BytesMut::new();
    status(&mut body, s);
    pack(&mut body, &post_op(fs, node));
    Results {
        body,
        ..Results::default()
    }
}

/// An error reply whose failure body is one `wcc_data`.
fn fail_wcc(
    fs: &DatastoreFs,
    s: nfsstat3,
    node: Option<&Node>,
    before: Option<&fattr3>,
) -> Results {
    let mut body = BytesMut::new();
    status(&mut body, s);
    pack(&mut body, &wcc(fs, node, before));
    Results {
        body,
        ..Results::default()
    }
}

/// Decoders for the argument pieces RFC 1813 shares between procedures.
trait NfsArgs<'a> {
    fn fh(&mut self) -> Option<&'a [u8]>;
    fn name(&mut self) -> Option<&'a [u8]>;
    fn sattr(&mut self) -> Option<SetAttr>;
}

impl<'a> NfsArgs<'a> for Reader<'a> {
    fn fh(&mut self) -> Option<&'a [u8]> {
        self.opaque(FH_MAX)
    }

    /// A file name of any length the record holds (over-long names get NAMETOOLONG from `fs`).
    fn name(&mut self) -> Option<&'a [u8]> {
        self.opaque(usize::MAX)
    }

    fn sattr(&mut self) -> Option<SetAttr> {
        let mut out = SetAttr::default();
        if self.bool()? {
            out.mode = Some(self.u32()?);
        }
        if self.bool()? {
            out.uid = Some(self.u32()?);
        }
        if self.bool()? {
            out.gid = Some(self.u32()?);
        }
        if self.bool()? {
            out.size = Some(self.u64()?);
        }
        out.atime = self.set_time()?;
        out.mtime = self.set_time()?;
        Some(out)
    }
}

impl Reader<'_> {
    /// A `set_atime`/`set_mtime`: DONT_CHANGE, SET_TO_SERVER_TIME, SET_TO_CLIENT_TIME and the
    /// time (nanoseconds past a second are cut to the second's last).
    fn set_time(&mut self) -> Option<Option<SetTime>> {
        Some(match self.u32()? {
            0 => None,
            1 => Some(SetTime::Server),
            2 => {
                let (s, ns) = (self.u32()?, self.u32()?);
                let t = jiff::Timestamp::new(i64::from(s), ns.min(999_999_999) as i32).ok()?;
                Some(SetTime::Client(t))
            }
            _ => return None,
        })
    }
}

/// Runs an NFSv3 procedure. `None`: the arguments could not be decoded (GARBAGE_ARGS).
async fn nfs_call(
    fs: &DatastoreFs,
    call: &Call<'_>,
    ip: IpAddr,
    who: &Who,
    budget: &Budget,
) -> Option<Results> {
    let mut r = Reader::new(call.args);
    let r = &mut r;
    Some(match call.proc_ {
        0 => Results::default(),
        1 => {
            let h = r.fh()?;
            match fs.resolve(h, ip).map(|node| fs.getattr(&node)) {
                Ok(a) => Results::packed(&nfs::GETATTR3res::Ok(nfs::GETATTR3resok {
                    obj_attributes: a,
                })),
                Err(s) => {
                    let mut body = BytesMut::new();
                    status(&mut body, s);
                    Results {
                        body,
                        ..Results::default()
                    }
                }
            }
        }
        2 => setattr(fs, r, ip, who).await?,
        3 => {
            let (dir, name) = (r.fh()?, r.name()?);
            let dir = match fs.resolve(dir, ip) {
                Ok(d) => d,
                Err(s) => return Some(fail_attr(fs, s, None)),
            };
            match fs.lookup(&dir, name, ip) {
                Ok(node) => Results::packed(&nfs::LOOKUP3res::Ok(nfs::LOOKUP3resok {
                    object: fh(fs, &node),
                    obj_attributes: post_op(fs, Some(&node)),
                    dir_attributes: post_op(fs, Some(&dir)),
                })),
                Err(s) => fail_attr(fs, s, Some(&dir)),
            }
        }
        4 => {
            let (h, asked) = (r.fh()?, r.u32()?);
            match fs.resolve(h, ip) {
                Ok(node) => Results::packed(&nfs::ACCESS3res::Ok(nfs::ACCESS3resok {
                    obj_attributes: post_op(fs, Some(&node)),
                    access: fs.access(&node, who, asked),
                })),
                Err(s) => fail_attr(fs, s, None),
            }
        }
        5 => {
            // READLINK: there are no symbolic links.
            let node = fs.resolve(r.fh()?, ip).ok();
            fail_attr(fs, nfsstat3::NFS3ERR_INVAL, node.as_ref())
        }
        6 => read(fs, r, ip, who, budget).await?,
        7 => write(fs, r, ip, who).await?,
        8 => create(fs, r, ip, who).await?,
        9 => {
            let (dir, name, attrs) = (r.fh()?, r.name()?, r.sattr()?);
            let dir = match fs.resolve(dir, ip) {
                Ok(d) => d,
                Err(s) => return Some(fail_wcc(fs, s, None, None)),
            };
            let before = Some(fs.getattr(&dir));
            let made = match fs.check(&dir, who, WRITE | EXEC) {
                Ok(()) => fs.mkdir(&dir, name, owned_by(attrs, who)).await,
                Err(s) => Err(s),
            };
            match made {
                Ok(node) => Results::packed(&nfs::MKDIR3res::Ok(nfs::MKDIR3resok {
                    obj: Nfs3Option::Some(fh(fs, &node)),
                    obj_attributes: post_op(fs, Some(&node)),
                    dir_wcc: wcc(fs, Some(&dir), before.as_ref()),
                })),
                Err(s) => fail_wcc(fs, s, Some(&dir), before.as_ref()),
            }
        }
        // SYMLINK, MKNOD: not made here. Only the folder is decoded.
        10 | 11 => {
            let (dir, _name) = (r.fh()?, r.name()?);
            match fs.resolve(dir, ip) {
                Ok(d) => fail_wcc(fs, fs.refuse_special(&d), Some(&d), None),
                Err(s) => fail_wcc(fs, s, None, None),
            }
        }
        12 | 13 => {
            let (dir, name) = (r.fh()?, r.name()?);
            let dir = match fs.resolve(dir, ip) {
                Ok(d) => d,
                Err(s) => return Some(fail_wcc(fs, s, None, None)),
            };
            let before = Some(fs.getattr(&dir));
            let removed = match fs.check(&dir, who, WRITE | EXEC) {
                Ok(()) => fs.remove(&dir, name, call.proc_ == 13).await,
                Err(s) => Err(s),
            };
            match removed {
                Ok(()) => {
                    let mut body = BytesMut::new();
                    status(&mut body, nfsstat3::NFS3_OK);
                    pack(&mut body, &wcc(fs, Some(&dir), before.as_ref()));
                    Results {
                        body,
                        ..Results::default()
                    }
                }
                Err(s) => fail_wcc(fs, s, Some(&dir), before.as_ref()),
            }
        }
        14 => {
            let (from_dir, from, to_dir, to) = (r.fh()?, r.name()?, r.fh()?, r.name()?);
            let (fd, td) = (fs.resolve(from_dir, ip), fs.resolve(to_dir, ip));
            let (b1, b2) = (
                fd.as_ref().ok().map(|d| fs.getattr(d)),
                td.as_ref().ok().map(|d| fs.getattr(d)),
            );
            let result = match (&fd, &td) {
                (Ok(f), Ok(t)) => match fs
                    .check(f, who, WRITE | EXEC)
                    .and_then(|()| fs.check(t, who, WRITE | EXEC))
                {
                    Ok(()) => fs.rename(f, from, t, to).await,
                    Err(s) => Err(s),
                },
                (Err(s), _) | (_, Err(s)) => Err(*s),
            };
            let mut body = BytesMut::new();
            status(&mut body, result.err().unwrap_or(nfsstat3::NFS3_OK));
            pack(&mut body, &wcc(fs, fd.as_ref().ok(), b1.as_ref()));
            pack(&mut body, &wcc(fs, td.as_ref().ok(), b2.as_ref()));
            Results {
                body,
                ..Results::default()
            }
        }
        15 => {
            // LINK: no hard links.
            let (file, dir, _name) = (r.fh()?, r.fh()?, r.name()?);
            let file = fs.resolve(file, ip).ok();
            let s = match fs.resolve(dir, ip) {
                Ok(d) => fs.refuse_special(&d),
                Err(s) => s,
            };
            let mut body = BytesMut::new();
            status(&mut body, s);
            pack(&mut body, &post_op(fs, file.as_ref()));
            pack(&mut body, &wcc_data::default());
            Results {
                body,
                ..Results::default()
            }
        }
        16 => {
            let (dir, cookie, _verf, count) = (r.fh()?, r.u64()?, r.fixed::<8>()?, r.u32()?);
            readdir(fs, ip, dir, cookie, None, count)
        }
        17 => {
            let (dir, cookie, _verf) = (r.fh()?, r.u64()?, r.fixed::<8>()?);
            let (dircount, maxcount) = (r.u32()?, r.u32()?);
            readdir(fs, ip, dir, cookie, Some(dircount), maxcount)
        }
        18 => {
            let node = match fs.resolve(r.fh()?, ip) {
                Ok(node) => node,
                Err(s) => return Some(fail_attr(fs, s, None)),
            };
            let (total, free, avail) = super::fsstat::space(fs.state_dir()).unwrap_or((0, 0, 0));
            let (files, ffree, favail) = super::fsstat::files(fs.state_dir()).unwrap_or((0, 0, 0));
            Results::packed(&nfs::FSSTAT3res::Ok(nfs::FSSTAT3resok {
                obj_attributes: post_op(fs, Some(&node)),
                tbytes: total,
                fbytes: free,
                abytes: avail,
                tfiles: files,
                ffiles: ffree,
                afiles: favail,
                invarsec: 0,
            }))
        }
        19 => {
            let node = match fs.resolve(r.fh()?, ip) {
                Ok(node) => node,
                Err(s) => return Some(fail_attr(fs, s, None)),
            };
            let info = fs.fsinfo();
            Results::packed(&nfs::FSINFO3res::Ok(nfs::FSINFO3resok {
                obj_attributes: post_op(fs, Some(&node)),
                rtmax: info.rtmax,
                rtpref: info.pref,
                rtmult: 4096,
                wtmax: info.rtmax,
                wtpref: info.pref,
                wtmult: 4096,
                dtpref: MAX_DIR_REPLY,
                maxfilesize: info.maxfilesize,
                time_delta: nfstime3 {
                    seconds: 0,
                    nseconds: 1,
                },
                // SETATTR keeps times (FSF3_CANSETTIME); no FSF3_LINK or FSF3_SYMLINK: LINK
                // and SYMLINK are NFS3ERR_NOTSUPP.
                properties: nfs::FSF3_HOMOGENEOUS | nfs::FSF3_CANSETTIME,
            }))
        }
        20 => {
            let node = match fs.resolve(r.fh()?, ip) {
                Ok(node) => node,
                Err(s) => return Some(fail_attr(fs, s, None)),
            };
            Results::packed(&nfs::PATHCONF3res::Ok(nfs::PATHCONF3resok {
                obj_attributes: post_op(fs, Some(&node)),
                linkmax: 1,
                name_max: MAX_NAME as u32,
                no_trunc: true,
                chown_restricted: true,
                case_insensitive: false,
                case_preserving: true,
            }))
        }
        21 => {
            let (h, _offset, _count) = (r.fh()?, r.u64()?, r.u32()?);
            let node = match fs.resolve(h, ip) {
                Ok(node) => node,
                Err(s) => return Some(fail_wcc(fs, s, None, None)),
            };
            let before = Some(fs.getattr(&node));
            match fs.commit(&node).await {
                Ok(()) => Results::packed(&nfs::COMMIT3res::Ok(nfs::COMMIT3resok {
                    file_wcc: wcc(fs, Some(&node), before.as_ref()),
                    verf: writeverf3(fs.identity().verifier()),
                })),
                Err(s) => fail_wcc(fs, s, Some(&node), before.as_ref()),
            }
        }
        _ => Results::unavail(),
    })
}

async fn setattr(fs: &DatastoreFs, r: &mut Reader<'_>, ip: IpAddr, who: &Who) -> Option<Results> {
    let (h, attrs) = (r.fh()?, r.sattr()?);
    let guard = if r.bool()? {
        Some(nfstime3 {
            seconds: r.u32()?,
            nseconds: r.u32()?,
        })
    } else {
        None
    };
    let node = match fs.resolve(h, ip) {
        Ok(node) => node,
        Err(s) => return Some(fail_wcc(fs, s, None, None)),
    };
    let before = fs.getattr(&node);
    if guard.is_some_and(|g| g != before.ctime) {
        return Some(fail_wcc(
            fs,
            nfsstat3::NFS3ERR_NOT_SYNC,
            Some(&node),
            Some(&before),
        ));
    }
    Some(match fs.setattr(&node, who, attrs).await {
        Ok(_) => Results::packed(&nfs::SETATTR3res::Ok(nfs::SETATTR3resok {
            obj_wcc: wcc(fs, Some(&node), Some(&before)),
        })),
        Err(s) => fail_wcc(fs, s, Some(&node), Some(&before)),
    })
}

async fn read(
    fs: &DatastoreFs,
    r: &mut Reader<'_>,
    ip: IpAddr,
    who: &Who,
    budget: &Budget,
) -> Option<Results> {
    let (h, offset, count) = (r.fh()?, r.u64()?, r.u32()?);
    let node = match fs.resolve(h, ip) {
        Ok(node) => node,
        Err(s) => return Some(fail_attr(fs, s, None)),
    };
    if let Err(s) = fs.check(&node, who, READ) {
        return Some(fail_attr(fs, s, Some(&node)));
    }
    #[cfg(feature = "jukebox-probe")]
    if jukebox_probe::now() {
        return Some(fail_attr(fs, nfsstat3::NFS3ERR_JUKEBOX, Some(&node)));
    }
    // Room for the data before it is read; held until the reply is written. A read that
    // waits long (held through an outage of the store) gives its room back meanwhile and
    // takes it again for its data: held reads must not keep every other call (writes,
    // cached reads) out of the budget.
    let want = count.min(MAX_IO) as usize;
    let taken = budget.take(want).await;
    let read = fs.read(&node, offset, count);
    tokio::pin!(read);
    // A read from memory is ready at once: no timer for it.
    use std::future::Future as _;
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(read.as_mut().poll(cx))).await;
    let (result, taken) = match first {
        std::task::Poll::Ready(r) => (r, taken),
        std::task::Poll::Pending => tokio::select! {
            r = &mut read => (r, taken),
            () = tokio::time::sleep(budget::PRESSURE_AFTER) => {
                drop(taken);
                let r = read.await;
                let len = r.as_ref().map_or(0, |(data, _)| data.len());
                (r, budget.take(len).await)
            }
        },
    };
    Some(match result {
        Ok((data, eof)) => {
            let mut body = BytesMut::with_capacity(128);
            status(&mut body, nfsstat3::NFS3_OK);
            pack(&mut body, &post_op(fs, Some(&node)));
            body.put_u32(data.len() as u32);
            body.put_u32(u32::from(eof));
            body.put_u32(data.len() as u32);
            Results {
                body,
                data,
                taken: Some(taken),
                unavail: false,
            }
        }
        Err(s) => fail_attr(fs, s, Some(&node)),
    })
}

async fn write(fs: &DatastoreFs, r: &mut Reader<'_>, ip: IpAddr, who: &Who) -> Option<Results> {
    let (h, offset, count, stable) = (r.fh()?, r.u64()?, r.u32()?, r.u32()?);
    let data = r.opaque(usize::MAX)?;
    if stable > 2 || (count as usize) > data.len() {
        return None;
    }
    // A client may send more than wtmax; it is told how much was written and sends the rest.
    let data = &data[..(count.min(MAX_IO) as usize)];
    let node = match fs.resolve(h, ip) {
        Ok(node) => node,
        Err(s) => return Some(fail_wcc(fs, s, None, None)),
    };
    let before = Some(fs.getattr(&node));
    if let Err(s) = fs.check(&node, who, WRITE) {
        return Some(fail_wcc(fs, s, Some(&node), before.as_ref()));
    }
    let sync = stable != 0;
    Some(match fs.write(&node, offset, data, sync).await {
        Ok(after) => Results::packed(&nfs::WRITE3res::Ok(nfs::WRITE3resok {
            file_wcc: wcc_data {
                before: pre_op(before.as_ref()),
                after: Nfs3Option::Some(after),
            },
            count: data.len() as u32,
            committed: if sync {
                nfs::stable_how::FILE_SYNC
            } else {
                nfs::stable_how::UNSTABLE
            },
            verf: writeverf3(fs.identity().verifier()),
        })),
        Err(s) => fail_wcc(fs, s, Some(&node), before.as_ref()),
    })
}

async fn create(fs: &DatastoreFs, r: &mut Reader<'_>, ip: IpAddr, who: &Who) -> Option<Results> {
    let (dir, name) = (r.fh()?, r.name()?);
    let (mode, attrs) = match r.u32()? {
        0 => (CreateMode::Unchecked, r.sattr()?),
        1 => (CreateMode::Guarded, r.sattr()?),
        2 => (CreateMode::Exclusive(r.fixed::<8>()?), SetAttr::default()),
        _ => return None,
    };
    let dir = match fs.resolve(dir, ip) {
        Ok(d) => d,
        Err(s) => return Some(fail_wcc(fs, s, None, None)),
    };
    let before = Some(fs.getattr(&dir));
    let made = match fs.check(&dir, who, WRITE | EXEC) {
        Ok(()) => fs.create(&dir, name, mode, owned_by(attrs, who)).await,
        Err(s) => Err(s),
    };
    Some(match made {
        Ok(node) => Results::packed(&nfs::CREATE3res::Ok(nfs::CREATE3resok {
            obj: Nfs3Option::Some(fh(fs, &node)),
            obj_attributes: post_op(fs, Some(&node)),
            dir_wcc: wcc(fs, Some(&dir), before.as_ref()),
        })),
        Err(s) => fail_wcc(fs, s, Some(&dir), before.as_ref()),
    })
}

/// A new file's or folder's attributes: the caller's owner and group unless the client set
/// them.
fn owned_by(attrs: SetAttr, who: &Who) -> SetAttr {
    SetAttr {
        uid: attrs.uid.or(Some(who.uid)),
        gid: attrs.gid.or(Some(who.gid)),
        ..attrs
    }
}

/// The largest READDIR(PLUS) reply, whatever the client asks (FSINFO's dtpref).
const MAX_DIR_REPLY: u32 = 64 * 1024;

/// READDIR (`dircount` None) and READDIRPLUS. Entries are added while the reply stays within
/// `maxcount` bytes (and, for READDIRPLUS, the names and cookies within `dircount`).
fn readdir(
    fs: &DatastoreFs,
    ip: IpAddr,
    dir: &[u8],
    cookie: u64,
    dircount: Option<u32>,
    maxcount: u32,
) -> Results {
    let dir = match fs.resolve(dir, ip) {
        Ok(d) => d,
        Err(s) => return fail_attr(fs, s, None),
    };
    // A client's counts are capped at what FSINFO offers (dtpref): a reply's size is the
    // server's choice, not the client's.
    let maxcount = maxcount.min(MAX_DIR_REPLY);
    let dircount = dircount.map(|d| d.min(MAX_DIR_REPLY));
    // No entry takes less than 24 bytes of a reply: ask for no more than fit, and one more
    // to tell whether the page ends the folder.
    let fit = (maxcount as usize / 24) + 1;
    // The root lists only the mounts this client may use.
    let entries = match fs.readdir(&dir, cookie, fit, ip) {
        Ok(e) => e,
        Err(s) => return fail_attr(fs, s, Some(&dir)),
    };
    let dir_attributes = post_op(fs, Some(&dir));
    // RPC header, status, attributes, verifier, end of list, eof.
    let mut used = 24 + 4 + dir_attributes.packed_size() + 8 + 4 + 4;
    let mut dir_used = 0usize;
    let limit = maxcount as usize;
    let total = entries.len();
    let mut plain = Vec::new();
    let mut plus = Vec::new();
    for e in entries {
        let (fileid, name) = (e.fileid, e.name);
        let name_len = 4 + name.len().next_multiple_of(4);
        let dir_part = 8 + name_len + 8;
        let size = match dircount {
            None => 4 + dir_part,
            Some(_) => 4 + dir_part + 4 + 84 + 4 + 4 + super::handle::HANDLE_LEN,
        };
        let over_dir = dircount.is_some_and(|d| dir_used + dir_part > d as usize);
        if used + size > limit || over_dir {
            break;
        }
        used += size;
        dir_used += dir_part;
        match dircount {
            None => plain.push(entry3 {
                fileid,
                name: name.into(),
                cookie: fileid,
            }),
            Some(_) => plus.push(entryplus3 {
                fileid,
                name: name.into(),
                cookie: fileid,
                name_attributes: Nfs3Option::Some(fs.getattr(&e.node)),
                name_handle: Nfs3Option::Some(fh(fs, &e.node)),
            }),
        }
    }
    let sent = plain.len() + plus.len();
    if sent == 0 && total > 0 {
        return fail_attr(fs, nfsstat3::NFS3ERR_TOOSMALL, Some(&dir));
    }
    let eof = sent == total;
    let cookieverf = cookieverf3([0; 8]);
    match dircount {
        None => Results::packed(&nfs::READDIR3res::Ok(nfs::READDIR3resok {
            dir_attributes,
            cookieverf,
            reply: nfs::dirlist3 {
                entries: List(plain),
                eof,
            },
        })),
        Some(_) => Results::packed(&nfs::READDIRPLUS3res::Ok(nfs::READDIRPLUS3resok {
            dir_attributes,
            cookieverf,
            reply: nfs::dirlistplus3 {
                entries: List(plus),
                eof,
            },
        })),
    }
}

/// MOUNT v3 (RFC 1813 appendix I): NULL, MNT (the export, a mount's folder or a folder in
/// it), DUMP (empty: mounts are not tracked per client), UMNT, UMNTALL (nothing to forget),
/// EXPORT (the export and the mount folders this client may use, open to the hosts the
/// allow-list lets connect).
fn mount_call(fs: &DatastoreFs, call: &Call<'_>, ip: IpAddr) -> Option<Results> {
    let mut r = Reader::new(call.args);
    let mut body = BytesMut::new();
    match call.proc_ {
        0 | 4 => {}
        1 => {
            let path = r.opaque(MNT_PATH_LEN)?;
            match fs.mount_path(path, ip).map(|node| fs.handle(&node)) {
                Ok(h) => {
                    body.put_u32(0); // MNT3_OK
                    rpc::put_opaque(&mut body, &h);
                    body.put_u32(1); // one flavor: AUTH_SYS
                    body.put_u32(rpc::AUTH_SYS);
                }
                Err(s) => {
                    tracing::info!(path = ?String::from_utf8_lossy(path), "MNT of a path that is not exported");
                    body.put_u32(mount_status(s));
                }
            }
        }
        2 => body.put_u32(0), // empty mount list
        3 => {
            r.opaque(MNT_PATH_LEN)?;
        }
        5 => {
            // The export, then each mount's folder this client may use (what `showmount -e`
            // and libnfs's discovery list; each can be mounted on its own).
            let mut paths = vec![fs.export().to_string()];
            paths.extend(
                fs.mount_names(ip)
                    .into_iter()
                    .map(|n| format!("{}/{n}", fs.export())),
            );
            for p in paths {
                body.put_u32(1); // an export follows
                rpc::put_opaque(&mut body, p.as_bytes());
                body.put_u32(0); // no groups
            }
            body.put_u32(0); // end of list
        }
        _ => return Some(Results::unavail()),
    }
    Some(Results {
        body,
        ..Results::default()
    })
}

/// MOUNT's `mountstat3` for an NFS status.
fn mount_status(s: nfsstat3) -> u32 {
    match s {
        nfsstat3::NFS3ERR_NOENT => 2,
        nfsstat3::NFS3ERR_ACCES => 13,
        nfsstat3::NFS3ERR_NOTDIR => 20,
        nfsstat3::NFS3ERR_NAMETOOLONG => 63,
        _ => 10006, // MNT3ERR_SERVERFAULT
    }
}

/// What clients do with NFS3ERR_JUKEBOX (scripts/jukebox-replies): READs answered so for
/// `LIVEMOUNT_JUKEBOX_SECS` seconds from the first one.
#[cfg(feature = "jukebox-probe")]
mod jukebox_probe {
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    pub(super) fn now() -> bool {
        static FIRST: OnceLock<Instant> = OnceLock::new();
        let secs = std::env::var("LIVEMOUNT_JUKEBOX_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        FIRST.get_or_init(Instant::now).elapsed() < Duration::from_secs(secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfs::fuzzing::one_mount;

    const HERE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// A call record with an AUTH_SYS credential of `uid`/`gid` and no more groups.
    fn call_as(uid: u32, gid: u32, proc_: u32, args: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        for w in [7, 0, 2, NFS_PROGRAM, 3, proc_] {
            b.put_u32(w);
        }
        let mut cred = BytesMut::new();
        cred.put_u32(0);
        rpc::put_opaque(&mut cred, b"test");
        for w in [uid, gid, 0] {
            cred.put_u32(w);
        }
        b.put_u32(rpc::AUTH_SYS);
        rpc::put_opaque(&mut b, &cred);
        b.put_u32(0);
        b.put_u32(0);
        b.extend_from_slice(args);
        b.to_vec()
    }

    /// The reply's results after the 24-byte accepted RPC header: status and the rest.
    async fn results(fs: &DatastoreFs, record: &[u8]) -> (u32, Vec<u8>) {
        let reply = handle(fs, record, HERE).await.unwrap();
        let body = reply.head[24..].to_vec();
        (u32::from_be_bytes(body[..4].try_into().unwrap()), body)
    }

    fn last_u32(body: &[u8]) -> u32 {
        u32::from_be_bytes(body[body.len() - 4..].try_into().unwrap())
    }

    fn fh_args(fh: &[u8]) -> BytesMut {
        let mut a = BytesMut::new();
        rpc::put_opaque(&mut a, fh);
        a
    }

    #[tokio::test]
    async fn fsinfo_says_times_can_be_set_and_links_cannot() {
        let dir = tempfile::tempdir().unwrap();
        let fs = one_mount(dir.path()).await.unwrap();
        let (folder, _) = crate::nfs::fuzzing::handles(&fs);
        let (status, body) = results(&fs, &call_as(0, 0, 19, &fh_args(&folder))).await;
        assert_eq!(status, 0);
        let props = last_u32(&body);
        assert_eq!(props, nfs::FSF3_HOMOGENEOUS | nfs::FSF3_CANSETTIME);
        assert_eq!(props & (nfs::FSF3_LINK | nfs::FSF3_SYMLINK), 0);
    }

    /// ACCESS answers by the mode bits and the caller, and WRITE agrees with it; root acts as
    /// nobody only with root_squash.
    #[tokio::test]
    async fn access_and_write_agree_on_mode_bits_and_caller_and_root_squash() {
        use nfs::{ACCESS3_EXTEND, ACCESS3_MODIFY, ACCESS3_READ};
        let dir = tempfile::tempdir().unwrap();
        let fs = one_mount(dir.path()).await.unwrap();
        let (_, disk) = crate::nfs::fuzzing::handles(&fs);
        let access = |uid| {
            let mut a = fh_args(&disk);
            a.put_u32(0x3f);
            call_as(uid, uid, 4, &a)
        };
        let write = |uid| {
            let mut a = fh_args(&disk);
            a.put_u64(0);
            a.put_u32(4);
            a.put_u32(2); // FILE_SYNC
            rpc::put_opaque(&mut a, b"data");
            call_as(uid, uid, 7, &a)
        };
        // The defaults: any caller reads and writes a read-write mount's disk; it never grows.
        let (_, body) = results(&fs, &access(1000)).await;
        assert_eq!(last_u32(&body) & 0x3f, ACCESS3_READ | ACCESS3_MODIFY);
        assert_eq!(results(&fs, &write(1000)).await.0, 0);
        // Root narrows the mode to 0644 (SETATTR mode, nothing else, no guard).
        let mut s = fh_args(&disk);
        for w in [1, 0o644, 0, 0, 0, 0, 0, 0] {
            s.put_u32(w);
        }
        assert_eq!(results(&fs, &call_as(0, 0, 2, &s)).await.0, 0);
        let (_, body) = results(&fs, &access(1000)).await;
        assert_eq!(last_u32(&body) & 0x3f, ACCESS3_READ, "others may only read");
        assert_eq!(
            results(&fs, &write(1000)).await.0,
            nfsstat3::NFS3ERR_ACCES as u32,
            "a WRITE that ACCESS denies is refused"
        );
        // Root is not squashed: it still writes.
        let (_, body) = results(&fs, &access(0)).await;
        assert_eq!(last_u32(&body) & ACCESS3_MODIFY, ACCESS3_MODIFY);
        assert_eq!(last_u32(&body) & ACCESS3_EXTEND, 0, "a disk never grows");
        assert_eq!(results(&fs, &write(0)).await.0, 0);
        // With root_squash, root acts as nobody: the 0644 disk is read-only to it too.
        let squashed = std::sync::Arc::try_unwrap(fs)
            .ok()
            .unwrap()
            .with_root_squash(true);
        let (_, body) = results(&squashed, &access(0)).await;
        assert_eq!(last_u32(&body) & 0x3f, ACCESS3_READ, "root squashed");
        assert_eq!(
            results(&squashed, &write(0)).await.0,
            nfsstat3::NFS3ERR_ACCES as u32
        );
        let fs = squashed;
        // A user may not change the mode of what it does not own.
        let mut s = fh_args(&disk);
        for w in [1, 0o666, 0, 0, 0, 0, 0, 0] {
            s.put_u32(w);
        }
        assert_eq!(
            results(&fs, &call_as(1000, 1000, 2, &s)).await.0,
            nfsstat3::NFS3ERR_PERM as u32
        );
    }
}
