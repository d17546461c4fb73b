//! CutFs: an in-memory FUSE file system that keeps only what was synced when the power is cut,
//! and that can fail writes with an error (EIO, ENOSPC) on request.
//!
//! Each inode has its current state and its durable state. fsync or fdatasync of a file makes
//! its bytes and size durable; fsync of a folder makes its names durable (the name of a new,
//! renamed or removed entry survives a cut only once its folder was fsynced after the change).
//! A file whose name is durable but whose bytes never were is empty after a cut. Nothing else
//! is ever written back: the most a power cut may take, short of tearing a single sync.
//!
//! A cut ([`CutFs::cut_at_sync`]) happens at the k-th sync from then on: that sync is not
//! made and every later call fails with EIO, like a dead disk. The test then kills the server
//! and [`CutFs::power_on`] mounts the durable state afresh (no kernel cache survives either).
//! A crash ([`CutFs::kill_at_sync`]) kills the process at the k-th sync instead and loses
//! nothing.
//! [`CutFs::fail_from`] fails every change (write, truncate, create, mkdir, rename, sync; for
//! EIO also unlink and rmdir) under a path from the k-th change on, until [`CutFs::heal`].
//!
//! Mounted with the kernel's FUSE (`/dev/fuse`) by fuser's own mount code (the mount syscall,
//! so root is needed; no libfuse or fusermount). One request at a time.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

const ROOT: u64 = 1;
/// Kernel caches of names and attributes: short, since a cut remounts anyway.
const TTL: Duration = Duration::from_millis(100);

#[derive(Clone)]
struct Node {
    dir: bool,
    mode: u32,
    parent: u64,
    name: OsString,
    data: Vec<u8>,
    synced_data: Vec<u8>,
    entries: BTreeMap<OsString, u64>,
    synced_entries: BTreeMap<OsString, u64>,
    mtime: SystemTime,
}

impl Node {
    fn new(dir: bool, mode: u32, parent: u64, name: &OsStr) -> Node {
        Node {
            dir,
            mode,
            parent,
            name: name.to_os_string(),
            data: Vec::new(),
            synced_data: Vec::new(),
            entries: BTreeMap::new(),
            synced_entries: BTreeMap::new(),
            mtime: SystemTime::now(),
        }
    }
}

/// Changes that fail: those under `under` (a path relative to the file system's root), from
/// the `from`-th one on.
struct Fault {
    under: PathBuf,
    errno: i32,
    from: usize,
}

#[derive(Default)]
struct State {
    nodes: HashMap<u64, Node>,
    next: u64,
    /// The path of every sync since the counters were last reset.
    syncs: Vec<String>,
    /// Changes (writes, creates, syncs, ...) since the counters were last reset.
    changes: Vec<String>,
    cut_at: Option<usize>,
    /// At this sync, the process is killed instead (SIGKILL; nothing is lost: a crash).
    kill_at: Option<(usize, i32)>,
    frozen: bool,
    fault: Option<Fault>,
}

impl State {
    fn fresh() -> State {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node::new(true, 0o755, ROOT, OsStr::new("")));
        State {
            nodes,
            next: ROOT + 1,
            ..State::default()
        }
    }

    /// What a cut leaves: the nodes reachable through synced names, with their synced bytes.
    fn durable(&self) -> State {
        let mut out = State {
            next: self.next,
            ..State::default()
        };
        let mut todo = vec![ROOT];
        while let Some(ino) = todo.pop() {
            let Some(n) = self.nodes.get(&ino) else {
                continue;
            };
            let mut n = n.clone();
            n.data = n.synced_data.clone();
            n.entries = n.synced_entries.clone();
            for (name, child) in &n.entries {
                todo.push(*child);
                if let Some(c) = self.nodes.get(child) {
                    // The name it is reached by now (a rename may not have been synced).
                    let mut c = c.clone();
                    c.parent = ino;
                    c.name = name.clone();
                    out.nodes.insert(*child, c);
                }
            }
            if let Some(prev) = out.nodes.get(&ino) {
                n.parent = prev.parent;
                n.name = prev.name.clone();
            }
            out.nodes.insert(ino, n);
        }
        out
    }

    fn path(&self, ino: u64) -> PathBuf {
        let mut parts = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let Some(n) = self.nodes.get(&cur) else {
                break;
            };
            parts.push(n.name.clone());
            cur = n.parent;
        }
        parts.iter().rev().collect()
    }

    fn child_path(&self, parent: u64, name: &OsStr) -> PathBuf {
        self.path(parent).join(name)
    }

    /// Counts a change to `path`; the fault's error if it fails.
    fn change(&mut self, what: &str, path: &Path, removal: bool) -> Result<(), Errno> {
        if self.frozen {
            return Err(Errno::EIO);
        }
        self.changes.push(format!("{what} {}", shown(path)));
        if let Some(f) = &self.fault {
            let ours = path.starts_with(&f.under);
            // A full disk still lets files be removed.
            let spared = removal && f.errno == libc::ENOSPC;
            if ours && !spared && self.changes.len() > f.from {
                return Err(Errno::from_i32(f.errno));
            }
        }
        Ok(())
    }

    /// Counts a sync of `ino`; at the cut, freezes instead.
    fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        let path = self.path(ino);
        self.change("sync", &path, false)?;
        if let Some((at, pid)) = self.kill_at {
            if at == self.syncs.len() {
                // The process stays in this call until it is answered, and dies then.
                // SAFETY: kill(2) with a pid and a signal number; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                self.syncs.push(format!("{} (killed)", shown(&path)));
                return Err(Errno::EIO);
            }
        }
        if self.cut_at == Some(self.syncs.len()) {
            self.frozen = true;
            self.syncs.push(format!("{} (cut)", shown(&path)));
            return Err(Errno::EIO);
        }
        self.syncs.push(shown(&path));
        let n = self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        if n.dir {
            n.synced_entries = n.entries.clone();
        } else {
            n.synced_data = n.data.clone();
        }
        Ok(())
    }

    fn live(&self) -> Result<(), Errno> {
        if self.frozen {
            Err(Errno::EIO)
        } else {
            Ok(())
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let n = self.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        let size = if n.dir { 4096 } else { n.data.len() as u64 };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: n.mtime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: n.mtime,
            kind: if n.dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: (n.mode & 0o7777) as u16,
            nlink: if n.dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn dir(&self, ino: u64) -> Result<&Node, Errno> {
        match self.nodes.get(&ino) {
            Some(n) if n.dir => Ok(n),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.dir(parent)?
            .entries
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    fn make(&mut self, parent: u64, name: &OsStr, dir: bool, mode: u32) -> Result<u64, Errno> {
        let path = self.child_path(parent, name);
        self.change(if dir { "mkdir" } else { "create" }, &path, false)?;
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(ino, Node::new(dir, mode, parent, name));
        let p = self.nodes.get_mut(&parent).ok_or(Errno::ENOENT)?;
        p.entries.insert(name.to_os_string(), ino);
        p.mtime = SystemTime::now();
        Ok(ino)
    }

    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let path = self.child_path(parent, name);
        self.change(if dir { "rmdir" } else { "unlink" }, &path, true)?;
        let ino = self.lookup(parent, name)?;
        let n = self.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        match (dir, n.dir) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            (true, true) if !n.entries.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        // The inode stays (open files go on working); it is unreachable from now on.
        let p = self.nodes.get_mut(&parent).ok_or(Errno::ENOENT)?;
        p.entries.remove(name);
        p.mtime = SystemTime::now();
        Ok(())
    }

    fn rename(
        &mut self,
        from: (u64, &OsStr),
        to: (u64, &OsStr),
        noreplace: bool,
    ) -> Result<(), Errno> {
        let (src, dst) = (self.child_path(from.0, from.1), self.child_path(to.0, to.1));
        self.change("rename", &src, false)?;
        self.change("rename to", &dst, false)?;
        let ino = self.lookup(from.0, from.1)?;
        let moving_dir = self.nodes.get(&ino).is_some_and(|n| n.dir);
        if let Ok(old) = self.lookup(to.0, to.1) {
            if noreplace {
                return Err(Errno::EEXIST);
            }
            let o = self.nodes.get(&old).ok_or(Errno::ENOENT)?;
            match (moving_dir, o.dir) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !o.entries.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
        }
        self.dir(to.0)?;
        if let Some(p) = self.nodes.get_mut(&from.0) {
            p.entries.remove(from.1);
        }
        if let Some(p) = self.nodes.get_mut(&to.0) {
            p.entries.insert(to.1.to_os_string(), ino);
        }
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.parent = to.0;
            n.name = to.1.to_os_string();
        }
        Ok(())
    }

    fn file(&mut self, ino: u64) -> Result<&mut Node, Errno> {
        match self.nodes.get_mut(&ino) {
            Some(n) if n.dir => Err(Errno::EISDIR),
            Some(n) => Ok(n),
            None => Err(Errno::ENOENT),
        }
    }

    fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let path = self.path(ino);
        self.change("write", &path, false)?;
        let n = self.file(ino)?;
        let end = offset as usize + data.len();
        if n.data.len() < end {
            n.data.resize(end, 0);
        }
        n.data[offset as usize..end].copy_from_slice(data);
        n.mtime = SystemTime::now();
        Ok(data.len() as u32)
    }

    fn truncate(&mut self, ino: u64, size: u64) -> Result<(), Errno> {
        let path = self.path(ino);
        self.change("truncate", &path, false)?;
        let n = self.file(ino)?;
        n.data.resize(size as usize, 0);
        n.mtime = SystemTime::now();
        Ok(())
    }
}

/// A path for messages: the root is `.`.
fn shown(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        ".".into()
    } else {
        path.display().to_string()
    }
}

/// The FUSE side: every call locks the shared state.
struct Fs(Arc<Mutex<State>>);

impl Fs {
    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn entry(reply: ReplyEntry, r: Result<FileAttr, Errno>) {
    match r {
        Ok(a) => reply.entry(&TTL, &a, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn empty(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let s = self.state();
        entry(
            reply,
            s.live()
                .and_then(|()| s.lookup(parent.0, name))
                .and_then(|ino| s.attr(ino)),
        );
    }

    fn getattr(&self, _: &Request, ino: INodeNo, _: Option<FileHandle>, reply: ReplyAttr) {
        let s = self.state();
        match s.live().and_then(|()| s.attr(ino.0)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.state();
        let r = (|| {
            s.live()?;
            if let Some(size) = size {
                s.truncate(ino.0, size)?;
            }
            if let Some(mode) = mode {
                let path = s.path(ino.0);
                s.change("chmod", &path, false)?;
                s.nodes.get_mut(&ino.0).ok_or(Errno::ENOENT)?.mode = mode;
            }
            if let Some(t) = mtime {
                let n = s.nodes.get_mut(&ino.0).ok_or(Errno::ENOENT)?;
                n.mtime = match t {
                    TimeOrNow::SpecificTime(t) => t,
                    TimeOrNow::Now => SystemTime::now(),
                };
            }
            s.attr(ino.0)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.state();
        let r = s
            .make(parent.0, name, true, mode & !umask)
            .and_then(|ino| s.attr(ino));
        entry(reply, r);
    }

    fn create(
        &self,
        _: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.state();
        let r = s
            .make(parent.0, name, false, mode & !umask)
            .and_then(|ino| s.attr(ino));
        match r {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.state().remove(parent.0, name, false);
        empty(reply, r);
    }

    fn rmdir(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.state().remove(parent.0, name, true);
        empty(reply, r);
    }

    fn rename(
        &self,
        _: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return reply.error(Errno::EINVAL);
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let r = self
            .state()
            .rename((parent.0, name), (newparent.0, newname), noreplace);
        empty(reply, r);
    }

    fn open(&self, _: &Request, ino: INodeNo, _: OpenFlags, reply: ReplyOpen) {
        let s = self.state();
        match s.live().and_then(|()| s.attr(ino.0)) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _: &Request,
        ino: INodeNo,
        _: FileHandle,
        offset: u64,
        size: u32,
        _: OpenFlags,
        _: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut s = self.state();
        let r = s.live().and_then(|()| {
            let n = s.file(ino.0)?;
            let start = (offset as usize).min(n.data.len());
            let end = (start + size as usize).min(n.data.len());
            Ok(n.data[start..end].to_vec())
        });
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _: &Request,
        ino: INodeNo,
        _: FileHandle,
        offset: u64,
        data: &[u8],
        _: WriteFlags,
        _: OpenFlags,
        _: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.state().write(ino.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _: &Request, ino: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        let r = self.state().sync(ino.0);
        empty(reply, r);
    }

    fn opendir(&self, _: &Request, ino: INodeNo, _: OpenFlags, reply: ReplyOpen) {
        let s = self.state();
        match s.live().and_then(|()| s.dir(ino.0).map(|_| ())) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _: &Request,
        ino: INodeNo,
        _: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let s = self.state();
        let n = match s.live().and_then(|()| s.dir(ino.0)) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let mut all = vec![
            (ino.0, FileType::Directory, OsString::from(".")),
            (n.parent, FileType::Directory, OsString::from("..")),
        ];
        for (name, child) in &n.entries {
            let dir = s.nodes.get(child).is_some_and(|c| c.dir);
            let kind = if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            all.push((*child, kind, name.clone()));
        }
        for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _: &Request, ino: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        let r = self.state().sync(ino.0);
        empty(reply, r);
    }

    fn statfs(&self, _: &Request, _: INodeNo, reply: ReplyStatfs) {
        if self.state().frozen {
            return reply.error(Errno::EIO);
        }
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096);
    }

    fn access(&self, _: &Request, _: INodeNo, _: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _: &Request,
        ino: INodeNo,
        _: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        let r = (|| {
            let path = s.path(ino.0);
            s.change("fallocate", &path, false)?;
            let n = s.file(ino.0)?;
            let end = (offset + length) as usize;
            if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
                let stop = end.min(n.data.len());
                if (offset as usize) < stop {
                    n.data[offset as usize..stop].fill(0);
                }
            } else if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && n.data.len() < end {
                n.data.resize(end, 0);
            }
            Ok(())
        })();
        empty(reply, r);
    }
}

/// A mounted CutFs; unmounted when dropped.
pub struct CutFs {
    at: PathBuf,
    state: Arc<Mutex<State>>,
    session: Option<fuser::BackgroundSession>,
}

impl CutFs {
    /// Mounts an empty CutFs at `at` (made if missing). Fails the test, saying what is
    /// missing, when FUSE cannot be mounted.
    pub fn mount(at: &Path) -> CutFs {
        std::fs::create_dir_all(at).unwrap();
        let mut fs = CutFs {
            at: at.to_path_buf(),
            state: Arc::new(Mutex::new(State::fresh())),
            session: None,
        };
        fs.attach();
        fs
    }

    fn attach(&mut self) {
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("cutfs".into()),
            fuser::MountOption::RW,
        ];
        let session =
            fuser::spawn_mount(Fs(self.state.clone()), &self.at, &config).unwrap_or_else(|e| {
                panic!(
                    "this test mounts a FUSE file system at {} and needs root and /dev/fuse \
                     (the kernel's fuse module): {e}",
                    self.at.display()
                )
            });
        self.session = Some(session);
    }

    fn detach(&mut self) {
        if let Some(s) = self.session.take() {
            if s.umount_and_join().is_err() {
                // Still busy (a process that has not let go yet): detach it lazily.
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&self.at)
                    .status();
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts counting syncs and changes from zero (and forgets any cut or fault).
    pub fn reset_counts(&self) {
        let mut s = self.state();
        s.syncs.clear();
        s.changes.clear();
        s.cut_at = None;
        s.kill_at = None;
        s.fault = None;
    }

    /// The paths of the syncs since the counts were reset (the cut one marked).
    pub fn syncs(&self) -> Vec<String> {
        self.state().syncs.clone()
    }

    /// The changes since the counts were reset.
    pub fn changes(&self) -> Vec<String> {
        self.state().changes.clone()
    }

    /// Counts from zero, and cuts the power at sync `k` (0: the next one).
    pub fn cut_at_sync(&self, k: usize) {
        self.reset_counts();
        self.state().cut_at = Some(k);
    }

    /// Counts from zero, and kills process `pid` with SIGKILL at sync `k` (0: the next one):
    /// that sync is not made, and nothing else is lost (the page cache outlives a crash).
    pub fn kill_at_sync(&self, k: usize, pid: u32) {
        self.reset_counts();
        self.state().kill_at = Some((k, pid as i32));
    }

    /// Whether the power was cut (every call fails with EIO).
    pub fn is_cut(&self) -> bool {
        self.state().frozen
    }

    /// Cuts the power now, if it was not cut already.
    pub fn cut(&self) {
        self.state().frozen = true;
    }

    /// Counts from zero, and fails every change under `under` (a path relative to the root)
    /// with `errno` from the `from`-th one on (0: the next one), until [`CutFs::heal`].
    pub fn fail_from(&self, under: &str, errno: i32, from: usize) {
        self.reset_counts();
        self.state().fault = Some(Fault {
            under: PathBuf::from(under),
            errno,
            from,
        });
    }

    /// Ends the fault: changes work again.
    pub fn heal(&self) {
        self.state().fault = None;
    }

    /// After a cut (the processes using the file system killed): mounts what was durable, as
    /// the next boot would find it.
    pub fn power_on(&mut self) {
        self.detach();
        let durable = self.state().durable();
        self.state = Arc::new(Mutex::new(durable));
        self.attach();
    }
}

impl Drop for CutFs {
    fn drop(&mut self) {
        self.cut();
        self.detach();
    }
}
