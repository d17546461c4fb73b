//! The operator's command line: `livemount <command>`.
//!
//! Owns: argument parsing (clap derive), human and `--json` output, progress bars.
//! Must not: hold logic of its own beyond calling the library and printing; errors carry their
//! own wording (they name the thing and what to do), the CLI only adds context.
//! One file per subcommand under `cli/`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use anyhow::Context;

use crate::repo::{RepoError, RepoLocation, Repository, S3Config, SnapshotInfo, SnapshotSpec};

mod backup;
mod backups;
mod files;
mod forget;
mod mount;
mod mounts;
mod plan;
mod prestage;
mod profile;
mod progress;
mod prune;
mod relocate;
mod repo_init;
mod restore;
mod serve;
mod show;
mod status;
mod unmount;
mod verify;

/// livemount: run a VM straight from its backup.
#[derive(Debug, Parser)]
#[command(name = "livemount", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// File creation mask for everything this command writes (state, overlays, repository,
    /// restored files), in octal [default: 0077: files 0600, folders 0700; for `serve`, its
    /// config's `umask`].
    #[arg(long, global = true, env = "LIVEMOUNT_UMASK", value_name = "OCTAL")]
    umask: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage a backup repository.
    #[command(subcommand)]
    Repo(RepoCommand),
    /// Back up a VM (its config and disks) into a new snapshot.
    Backup(backup::BackupArgs),
    /// List snapshots.
    Backups(backups::BackupsArgs),
    /// Show one snapshot: its VM, config and disks.
    Show(show::ShowArgs),
    /// Re-read and check every chunk of one snapshot or of all; exits 1 if any is bad.
    Verify(verify::VerifyArgs),
    /// Forget snapshots: by a retention policy (--keep-..., --policy) or by name. Their chunks
    /// go at the next prune; snapshots in use (a live mount, a restore) are never forgotten.
    Forget(forget::ForgetArgs),
    /// Delete the chunks no snapshot needs; safe beside running backups and live mounts.
    Prune(prune::PruneArgs),
    /// Restore a snapshot in full (config and raw disks) into a folder.
    Restore(restore::RestoreArgs),
    /// Guest files: list the volumes, folders and files inside a snapshot's disks, or copy
    /// some out, without starting the VM.
    #[command(subcommand)]
    Files(files::FilesCommand),
    /// Run the media agent: serve live mounts as an NFSv3 datastore.
    Serve(serve::ServeArgs),
    /// Live-mount a snapshot: a folder in the datastore a hypervisor runs the VM from.
    Mount(mount::MountArgs),
    /// List live mounts.
    Mounts(mounts::MountsArgs),
    /// Remove a live mount; the backup is unchanged.
    Unmount(unmount::UnmountArgs),
    /// Move a live-mounted VM's disks to primary storage while it runs, then hand over.
    Relocate(relocate::RelocateArgs),
    /// Show the running server's state.
    Status(status::StatusArgs),
    /// Warm a VM's boot set (from its boot profile) into the server's disk cache, ahead of any
    /// mount.
    Prestage(prestage::PrestageArgs),
    /// Recovery plans: mount a list of VMs in groups (`apply`), and see where each stands
    /// (`status`).
    #[command(subcommand)]
    Plan(plan::PlanCommand),
    /// Boot profiles: what each VM reads while booting, learned from its live mounts.
    #[command(subcommand)]
    Profile(profile::ProfileCommand),
}

#[derive(Debug, Subcommand)]
enum RepoCommand {
    /// Create a repository in a new or empty directory.
    Init(repo_init::RepoInitArgs),
}

/// `--repo`, shared by every command that reads a repository.
#[derive(Debug, Clone, Args)]
pub struct RepoArgs {
    /// The repository: a directory, or s3://BUCKET/PREFIX (endpoint, region and keys from the
    /// AWS_* variables or the [repository] section of --repo-config).
    #[arg(long, env = "LIVEMOUNT_REPO", value_name = "DIR|s3://BUCKET/PREFIX")]
    pub repo: Option<String>,
    /// A TOML file with `repo = ...` and a [repository] section (serve's config file works).
    #[arg(long, env = "LIVEMOUNT_REPO_CONFIG", value_name = "FILE")]
    pub repo_config: Option<PathBuf>,
    /// Slow every read of the repository on purpose, as LATENCY,BANDWIDTH (e.g. 5ms,200MB):
    /// for benchmarks against cold storage, as serve's [slow_repository] does.
    #[arg(
        long,
        env = "LIVEMOUNT_SLOW_REPOSITORY",
        hide = true,
        value_name = "LATENCY,BANDWIDTH"
    )]
    pub slow_repository: Option<String>,
}

impl RepoArgs {
    pub async fn open(&self) -> anyhow::Result<Repository> {
        let file = match &self.repo_config {
            Some(path) => RepoFile::read(path)?,
            None => RepoFile::default(),
        };
        let text = self
            .repo
            .clone()
            .or(file.repo)
            .context("--repo is required (a directory or s3://BUCKET/PREFIX)")?;
        let location = RepoLocation::parse(&text)?;
        let expiry = file.retention.clone().unwrap_or_default().lease_expiry()?;
        let repo = Repository::open_at(&location, &file.repository.unwrap_or_default())
            .await?
            .with_lease_expiry(expiry);
        let Some(text) = &self.slow_repository else {
            return Ok(repo);
        };
        let (latency, bandwidth) = text.split_once(',').unwrap_or((text.as_str(), ""));
        let how = crate::repo::Slowness::parse(
            Some(latency),
            (!bandwidth.is_empty()).then_some(bandwidth),
        )
        .map_err(|e| RepoError::Invalid(format!("--slow-repository {text:?}: {e}")))?;
        Ok(repo.slowed(how))
    }
}

/// What the repository commands take from a config file: `repo` and `[repository]`. Other
/// settings (serve's) are ignored here, so one file serves every command.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct RepoFile {
    pub repo: Option<String>,
    pub repository: Option<S3Config>,
    pub retention: Option<RetentionFile>,
}

/// `[retention]`: the policy `forget --policy` applies, and how long leases count.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetentionFile {
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    /// How long a lease (an agent's, a backup's, a restore's) counts after its holder last
    /// renewed it (default `"10m"`); the same on every agent sharing the repository.
    pub lease_expiry: Option<String>,
}

impl RetentionFile {
    pub(crate) fn policy(&self) -> crate::repo::retention::Policy {
        crate::repo::retention::Policy {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
        }
    }

    /// `lease_expiry`, checked.
    pub(crate) fn lease_expiry(&self) -> anyhow::Result<std::time::Duration> {
        let Some(text) = &self.lease_expiry else {
            return Ok(crate::repo::lease::DEFAULT_EXPIRY);
        };
        let d = crate::units::parse_duration(text)
            .map_err(|e| anyhow::anyhow!("retention.lease_expiry {text:?}: {e}"))?;
        if d < crate::repo::lease::MIN_EXPIRY {
            anyhow::bail!(
                "retention.lease_expiry {text:?} is below {} s: leases are renewed every tenth of it",
                crate::repo::lease::MIN_EXPIRY.as_secs()
            );
        }
        Ok(d)
    }
}

impl RepoFile {
    pub(crate) fn read(path: &std::path::Path) -> anyhow::Result<RepoFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{}: bad settings", path.display()))
    }
}

/// A snapshot argument: `VM@TIME`, an id prefix, or a VM name (its latest, or with `--at` its
/// latest at or before TIME).
#[derive(Debug, Clone, Args)]
pub struct SnapshotArgs {
    /// VM@TIME, a unique id prefix, or a VM name (its latest snapshot).
    #[arg(value_name = "SNAPSHOT")]
    pub snapshot: String,
    /// With a VM name: its latest snapshot at or before this RFC 3339 time.
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
}

impl SnapshotArgs {
    pub async fn resolve(&self, repo: &Repository) -> Result<SnapshotInfo, RepoError> {
        repo.resolve(&spec(&self.snapshot, self.at.as_deref())?)
            .await
    }
}

pub(crate) fn spec(text: &str, at: Option<&str>) -> Result<SnapshotSpec, RepoError> {
    let at = at.map(crate::repo::parse_time).transpose()?;
    Ok(SnapshotSpec::new(text, at))
}

/// Parses the command line and runs the command. Returns the process exit code.
pub async fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        // A command's output piped into `head` ends it quietly, as for any Unix tool, instead
        // of a panic on the closed pipe. The server keeps SIGPIPE ignored: a client that goes
        // away is an error on its connection only.
        // SAFETY: signal(2) only sets this process's disposition of SIGPIPE; nothing in these
        // commands installs a handler of its own for it.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // Before anything is written. main.rs has set the default (0077) already.
    let umask = match &cli.umask {
        Some(text) => Some(
            text.parse::<crate::durable::Umask>()
                .map_err(|e| anyhow::anyhow!("--umask {text:?}: {e}"))?,
        ),
        None => None,
    };
    if let Some(mask) = umask {
        crate::durable::set_umask(mask);
    }
    match cli.command {
        Command::Repo(RepoCommand::Init(a)) => repo_init::run(a).await,
        Command::Backup(a) => backup::run(a).await,
        Command::Backups(a) => backups::run(a).await,
        Command::Show(a) => show::run(a).await,
        Command::Verify(a) => verify::run(a).await,
        Command::Restore(a) => restore::run(a).await,
        Command::Files(c) => files::run(c).await,
        Command::Forget(a) => forget::run(a).await,
        Command::Prune(a) => prune::run(a).await,
        Command::Serve(a) => serve::run(a, umask).await,
        Command::Mount(a) => mount::run(a).await,
        Command::Mounts(a) => mounts::run(a).await,
        Command::Unmount(a) => unmount::run(a).await,
        Command::Relocate(a) => relocate::run(a).await,
        Command::Status(a) => status::run(a).await,
        Command::Prestage(a) => prestage::run(a).await,
        Command::Plan(c) => plan::run(c).await,
        Command::Profile(c) => profile::run(c),
    }
}

/// Bytes as people read them: `1.5 GiB`.
pub(crate) fn human(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

/// Prints a value as pretty JSON on stdout.
pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
