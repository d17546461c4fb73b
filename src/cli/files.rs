//! `livemount files ls SNAPSHOT [PATH] [--disk NAME]` and
//! `livemount files get SNAPSHOT PATH... --to DIR`: guest files, read from the backup.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::progress::Bar;
use super::{human, RepoArgs, SnapshotArgs};
use crate::guestfs::{Entry, EntryKind, GuestFiles};
use crate::repo::lease::{random_name, LeaseHolder, LeaseKind, SnapshotUse};

#[derive(Debug, Subcommand)]
pub enum FilesCommand {
    /// List a snapshot's volumes, then the folder or file PATH names inside one.
    Ls(LsArgs),
    /// Copy files or whole folders out of a snapshot's volumes into a folder.
    Get(GetArgs),
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    snapshot: SnapshotArgs,
    /// A volume (`/vda/part1`) or a path inside one (`/vda/part1/etc`); default: `/`.
    #[arg(value_name = "PATH", default_value = "/")]
    path: String,
    /// Only this disk: its device (`vda`, `scsi0:0`) or its name in the config.
    #[arg(long, value_name = "NAME")]
    disk: Option<String>,
    /// Print the listing as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    snapshot: SnapshotArgs,
    /// Files, folders or whole volumes to copy (`/vda/part1/etc/hosts`).
    #[arg(value_name = "PATH", required = true)]
    paths: Vec<String>,
    /// Folder to copy into (made if missing; nothing in it is ever overwritten).
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// Only this disk: its device (`vda`, `scsi0:0`) or its name in the config.
    #[arg(long, value_name = "NAME")]
    disk: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(c: FilesCommand) -> anyhow::Result<ExitCode> {
    match c {
        FilesCommand::Ls(a) => ls(a).await,
        FilesCommand::Get(a) => get(a).await,
    }
}

/// Opens the snapshot's disks. With `lease_for`, first takes a restore lease on the snapshot
/// (as `restore` does: neither forgotten nor pruned while the copy runs; decision 0017).
async fn open(
    repo: &RepoArgs,
    snapshot: &SnapshotArgs,
    disk: Option<&str>,
    lease_for: Option<String>,
) -> anyhow::Result<(Arc<GuestFiles>, Option<Arc<LeaseHolder>>)> {
    let repo = repo.open().await?;
    let info = snapshot.resolve(&repo).await?;
    let lease = match lease_for {
        Some(what) => Some(
            repo.take_lease(
                random_name(LeaseKind::Restore),
                LeaseKind::Restore,
                "files get".into(),
                vec![SnapshotUse {
                    snapshot: info.id,
                    what,
                }],
            )
            .await?,
        ),
        None => None,
    };
    let snap = repo.snapshot(&info.id).await?;
    let files = GuestFiles::open(&snap, disk)
        .await
        .with_context(|| format!("snapshot {}", info.name))?;
    Ok((Arc::new(files), lease))
}

fn mtime(e: &Entry) -> String {
    jiff::Timestamp::from_second(e.mtime)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|_| e.mtime.to_string())
}

/// An owner id, `?` when the file system gives none.
fn id(v: u32) -> String {
    if v == crate::guestfs::UNKNOWN_ID {
        "?".into()
    } else {
        v.to_string()
    }
}

fn kind_char(k: EntryKind) -> char {
    match k {
        EntryKind::Dir => 'd',
        EntryKind::File => '-',
        EntryKind::Symlink => 'l',
        EntryKind::Special => 's',
    }
}

async fn ls(a: LsArgs) -> anyhow::Result<ExitCode> {
    let (files, _) = open(&a.repo, &a.snapshot, a.disk.as_deref(), None).await?;
    let listing = files
        .list(&a.path)
        .await
        .with_context(|| format!("snapshot {}", files.snapshot()))?;
    if a.json {
        super::print_json(&listing)?;
        return Ok(ExitCode::SUCCESS);
    }
    for v in &listing.volumes {
        match &v.reason {
            None => println!(
                "{:<24} {:<8} {:>10}",
                v.path,
                v.kind.as_str(),
                human(v.size)
            ),
            Some(r) => println!(
                "{:<24} {:<8} {:>10}  ({r})",
                v.path,
                v.kind.as_str(),
                human(v.size)
            ),
        }
    }
    if let Some(path) = &listing.path {
        println!();
        println!("{path}:");
        for e in &listing.entries {
            let name = match &e.target {
                Some(t) => format!("{} -> {t}", e.name),
                None if e.kind == EntryKind::Dir => format!("{}/", e.name),
                None => e.name.clone(),
            };
            println!(
                "{}{:04o} {:>6} {:>6} {:>12} {} {name}",
                kind_char(e.kind),
                e.mode,
                id(e.uid),
                id(e.gid),
                e.size,
                mtime(e)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn get(a: GetArgs) -> anyhow::Result<ExitCode> {
    let what = format!("files get into {}", a.to.display());
    let (files, lease) = open(&a.repo, &a.snapshot, a.disk.as_deref(), Some(what)).await?;
    let bar = Arc::new(Bar::new(&format!("get {}", files.snapshot()), true, a.json));
    let summary = files.get(&a.paths, &a.to, bar.clone()).await;
    bar.finish();
    if let Some(lease) = lease {
        if let Err(e) = lease.release().await {
            tracing::warn!(error = %e, "cannot remove the lease of files get; it expires by itself");
        }
    }
    let s = summary.with_context(|| format!("files get from snapshot {}", files.snapshot()))?;
    if a.json {
        super::print_json(&s)?;
    } else {
        println!(
            "copied {} files ({}), {} folders, {} links into {} in {:.1} s",
            s.files,
            human(s.bytes),
            s.folders,
            s.symlinks,
            a.to.display(),
            s.seconds
        );
        for p in &s.not_copied {
            println!("  not copied (device, FIFO or socket): {p}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
