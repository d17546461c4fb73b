//! `livemount serve`: the media agent. NFSv3 + MOUNT on one port, the portmapper on 111, NBD
//! when asked (`--nbd`), the control API on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::{Agent, Datastore};
use crate::allow::AllowList;
use crate::cache::disk::DiskCache;
use crate::control::{self, ApiAddr, ApiState};
use crate::datastore::DatastoreCore;
use crate::durable::{self, Umask};
use crate::iscsi::{DatastoreTargets, IscsiServer};
use crate::nbd::{DatastoreExports, NbdServer};
use crate::nfs::portmap::{Mapping, Portmapper};
use crate::nfs::{DatastoreFs, Identity, NfsServer};
use crate::prestage::Learning;
use crate::relocate::RelocateRoots;
use crate::repo::{RepoLocation, Repository, S3Config, Slowness};
use crate::units::parse_duration;

/// NBD's port (IANA).
const NBD_PORT: u16 = 10809;
const ISCSI_PORT: u16 = 3260;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML file with any of the settings below (flags given on the command line win).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The repository: a directory, or s3://BUCKET/PREFIX (endpoint, region and keys from the
    /// AWS_* variables or [repository] in --config).
    #[arg(long, env = "LIVEMOUNT_REPO", value_name = "DIR|s3://BUCKET/PREFIX")]
    repo: Option<String>,
    /// The state directory: mounts, their writes, the API token.
    #[arg(long, env = "LIVEMOUNT_STATE", value_name = "DIR")]
    state: Option<PathBuf>,
    /// NFS and MOUNT address [default: 0.0.0.0:2049].
    #[arg(long, value_name = "ADDR:PORT")]
    nfs: Option<SocketAddr>,
    /// Portmapper address, or `off` [default: 0.0.0.0:111].
    #[arg(long, value_name = "ADDR:111|off")]
    portmap: Option<String>,
    /// Serve the mounts' disks over NBD on this address (port 10809 if none is given), as
    /// exports named MOUNT/DISK [default: off].
    #[arg(long, value_name = "ADDR[:PORT]|off")]
    nbd: Option<String>,
    /// Serve the mounts over iSCSI on this address (port 3260 if none is given): a target
    /// iqn.2026-12.io.livemount:MOUNT per mount, a LUN per disk [default: off].
    #[arg(long, value_name = "ADDR[:PORT]|off")]
    iscsi: Option<String>,
    /// Every iSCSI target requires CHAP: user `livemount`, a secret per target (`livemount
    /// mount` prints it) [default: no authentication beyond --allow].
    #[arg(long)]
    iscsi_chap: bool,
    /// Control API address [default: 127.0.0.1:7480].
    #[arg(long, value_name = "ADDR:PORT")]
    api: Option<SocketAddr>,
    /// Read cache size [default: 2GiB].
    #[arg(long, value_name = "SIZE")]
    cache_size: Option<String>,
    /// A folder on local disk (an SSD) that keeps fetched chunks across restarts, behind the
    /// memory cache; needs --cache-disk-size.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// The most the disk cache holds, e.g. 50GiB.
    #[arg(long, value_name = "SIZE")]
    cache_disk_size: Option<String>,
    /// The export path [default: /livemount].
    #[arg(long, value_name = "PATH")]
    export: Option<String>,
    /// Client addresses allowed (CIDR, repeatable) [default: loopback only].
    #[arg(long = "allow", value_name = "CIDR")]
    allow: Vec<String>,
    /// The host name or address hypervisors use to reach this server, shown in attach
    /// instructions [default: the NFS address, or this host's name when that is 0.0.0.0].
    #[arg(long, value_name = "HOST")]
    advertise: Option<String>,
    /// How long a VM read that misses the cache waits for a repository that cannot be
    /// reached, retried with back-off, before it fails with an I/O error; 0s: fail at once
    /// [default: 120s].
    #[arg(long, value_name = "DURATION")]
    store_outage_grace: Option<String>,
}

/// The settings of `serve`, as a TOML file holds them. Every field is optional; defaults below.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// A directory or `s3://BUCKET/PREFIX`.
    pub repo: Option<String>,
    /// How to reach an S3 repository (endpoint, region, keys); each setting left out comes
    /// from its AWS_* environment variable.
    pub repository: Option<S3Config>,
    pub state: Option<PathBuf>,
    /// Default `0.0.0.0:2049`.
    pub nfs: Option<SocketAddr>,
    /// Default `0.0.0.0:111`; `off` for none.
    pub portmap: Option<String>,
    /// NBD address (`ADDR:PORT`, or `ADDR` for port 10809); default off.
    pub nbd: Option<String>,
    /// iSCSI address (`ADDR:PORT`, or `ADDR` for port 3260); default off.
    pub iscsi: Option<String>,
    /// Every iSCSI target requires CHAP (default false).
    pub iscsi_chap: Option<bool>,
    /// Default `127.0.0.1:7480`.
    pub api: Option<SocketAddr>,
    /// Default `2GiB`.
    pub cache_size: Option<String>,
    /// The disk cache's folder; none by default.
    pub cache_dir: Option<PathBuf>,
    /// The disk cache's size; required with `cache_dir`.
    pub cache_disk_size: Option<String>,
    /// Default `/livemount`.
    pub export: Option<String>,
    /// Default loopback only.
    pub allow: Option<Vec<String>>,
    pub advertise: Option<String>,
    /// Accept AUTH_NONE calls (default false: AUTH_SYS required).
    pub allow_auth_none: Option<bool>,
    /// NFS calls from root (uid 0) act as `nobody` (65534), for the mode bits and the owner of
    /// new files (default false: hypervisors connect as root and must create their files).
    pub root_squash: Option<bool>,
    /// Serve `/metrics` to every host that reaches the API (default false: loopback only).
    pub metrics_public: Option<bool>,
    /// The most memory NFS calls in flight may hold, across connections (default `256MiB`).
    pub call_memory: Option<String>,
    /// Slow every repository read down on purpose (tests and benchmarks of cold storage).
    pub slow_repository: Option<SlowRepoConfig>,
    /// Boot windows and profiles.
    pub profiles: Option<ProfilesConfig>,
    /// Fetch ahead of sequential readers of a disk (default true).
    pub read_ahead: Option<bool>,
    /// How long a VM read that misses the cache waits for a repository that cannot be reached
    /// (default `"120s"`; `"0s"`: fail at once).
    pub store_outage_grace: Option<String>,
    /// File creation mask for the state directory and everything else the server writes, in
    /// octal. Default `"0077"`: files 0600, folders 0700 (`--umask` or `LIVEMOUNT_UMASK` win).
    pub umask: Option<String>,
    /// The folders `relocate --to DIR` may write into (absolute, existing): DIR must lie under
    /// one of them, reached without a symbolic link. Default none: relocation is refused.
    pub relocate_roots: Option<Vec<PathBuf>>,
    /// The media agent's default network renames, `OLD = "NEW"` (libvirt network or bridge
    /// names, ESXi port group names), e.g. `[network_map]` then `default = "lab"`. Applied to
    /// a new mount's NICs whose network its own `--network-map` does not name; an entry no NIC
    /// uses is ignored. Default none.
    pub network_map: Option<std::collections::BTreeMap<String, String>>,
    /// The retention policy (for `forget --policy` with this file) and `lease_expiry`: how
    /// long this agent's lease counts after its last renewal.
    pub retention: Option<crate::cli::RetentionFile>,
}

/// `[profiles]`: how new mounts learn their VM's boot.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfilesConfig {
    /// Record boot windows and learn profiles (default true).
    pub learn: Option<bool>,
    /// Longest boot window (default `"120s"`).
    pub window: Option<String>,
    /// A window ends after this long without a block read for the first time (default `"15s"`).
    pub quiet: Option<String>,
}

impl ProfilesConfig {
    fn learning(&self) -> anyhow::Result<Option<Learning>> {
        if self.learn == Some(false) {
            return Ok(None);
        }
        let mut l = Learning::default();
        if let Some(t) = &self.window {
            l.limit =
                parse_duration(t).map_err(|e| anyhow::anyhow!("profiles.window {t:?}: {e}"))?;
        }
        if let Some(t) = &self.quiet {
            l.quiet =
                parse_duration(t).map_err(|e| anyhow::anyhow!("profiles.quiet {t:?}: {e}"))?;
        }
        Ok(Some(l))
    }
}

/// `[slow_repository]`: reproduce slow backup storage with a local repository.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowRepoConfig {
    /// Added to every fetch, e.g. `"5ms"`.
    pub latency: Option<String>,
    /// Shared read bandwidth per second, e.g. `"200MB"`.
    pub bandwidth: Option<String>,
}

/// Runs the server. `umask`: the one given on the command line, already set (it wins over
/// the config's).
pub async fn run(a: ServeArgs, umask: Option<Umask>) -> anyhow::Result<ExitCode> {
    let file: ServeConfig = match &a.config {
        Some(p) => toml::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("{}: not a valid serve config", p.display()))?,
        None => ServeConfig::default(),
    };
    if let (None, Some(text)) = (umask, &file.umask) {
        let mask: Umask = text
            .parse()
            .map_err(|e| anyhow::anyhow!("umask {text:?} in the config: {e}"))?;
        crate::durable::set_umask(mask);
    }
    let repo_text = a
        .repo
        .or(file.repo)
        .context("--repo is required (or `repo` in --config)")?;
    let location = RepoLocation::parse(&repo_text)?;
    let state = a
        .state
        .or(file.state)
        .context("--state is required (or `state` in --config)")?;
    let nfs_addr = a.nfs.or(file.nfs).unwrap_or(([0, 0, 0, 0], 2049).into());
    let portmap = a
        .portmap
        .or(file.portmap)
        .unwrap_or_else(|| "0.0.0.0:111".into());
    let portmap_addr: Option<SocketAddr> = match portmap.as_str() {
        "off" => None,
        text => Some(
            text.parse()
                .with_context(|| format!("--portmap {text:?}: give ADDR:PORT or off"))?,
        ),
    };
    let nbd_text = a.nbd.or(file.nbd.clone());
    let nbd_addr = optional_listen(nbd_text.as_deref(), "--nbd", NBD_PORT)?;
    let iscsi_text = a.iscsi.or(file.iscsi.clone());
    let iscsi_addr = optional_listen(iscsi_text.as_deref(), "--iscsi", ISCSI_PORT)?;
    let iscsi_chap = a.iscsi_chap || file.iscsi_chap.unwrap_or(false);
    if iscsi_chap && iscsi_addr.is_none() {
        anyhow::bail!("--iscsi-chap needs --iscsi ADDR:PORT (iSCSI is off)");
    }
    let api_addr = a.api.or(file.api).unwrap_or(([127, 0, 0, 1], 7480).into());
    let cache_text = a
        .cache_size
        .or(file.cache_size)
        .unwrap_or_else(|| "2GiB".into());
    let cache_bytes = cache_text
        .parse::<bytesize::ByteSize>()
        .map_err(|e| anyhow::anyhow!("--cache-size {cache_text:?}: {e}"))?
        .as_u64();
    let export = a
        .export
        .or(file.export)
        .unwrap_or_else(|| "/livemount".into());
    let allow_items = if a.allow.is_empty() {
        file.allow.unwrap_or_default()
    } else {
        a.allow
    };
    let allow = if allow_items.is_empty() {
        AllowList::loopback()
    } else {
        AllowList::parse(&allow_items).map_err(|e| anyhow::anyhow!("--allow: {e}"))?
    };

    let call_memory = match &file.call_memory {
        None => crate::nfs::CALL_MEMORY,
        Some(t) => {
            let b = t
                .parse::<bytesize::ByteSize>()
                .map_err(|e| anyhow::anyhow!("call_memory {t:?}: {e} (try \"256MiB\")"))?
                .as_u64();
            if b < 4 << 20 {
                anyhow::bail!("call_memory {t:?} is below 4MiB: a single 1 MiB READ or WRITE must fit several times");
            }
            usize::try_from(b).unwrap_or(usize::MAX)
        }
    };
    let cache_dir = a.cache_dir.or(file.cache_dir);
    let disk_size = match a.cache_disk_size.or(file.cache_disk_size) {
        None => None,
        Some(t) => Some(
            t.parse::<bytesize::ByteSize>()
                .map_err(|e| anyhow::anyhow!("--cache-disk-size {t:?}: {e}"))?
                .as_u64(),
        ),
    };
    let disk_cache = match (&cache_dir, disk_size) {
        (None, None) => None,
        (Some(dir), Some(size)) => Some((dir.clone(), size)),
        (Some(_), None) => anyhow::bail!(
            "--cache-dir needs --cache-disk-size (the most the disk cache may hold, e.g. 50GiB)"
        ),
        (None, Some(_)) => {
            anyhow::bail!("--cache-disk-size needs --cache-dir (the disk cache's folder)")
        }
    };
    if disk_cache.as_ref().is_some_and(|(_, size)| *size == 0) {
        anyhow::bail!("--cache-disk-size must be above zero");
    }
    let learning = file.profiles.unwrap_or_default().learning()?;
    if let Some(map) = &file.network_map {
        crate::vmconfig::check_network_map(map)
            .map_err(|e| anyhow::anyhow!("[network_map] in the config: {e}"))?;
    }
    let relocate_roots = RelocateRoots::new(file.relocate_roots.clone().unwrap_or_default())?;
    if relocate_roots.is_empty() {
        tracing::info!("relocation is off: no relocate_roots in the config");
    }
    let lease_expiry = file.retention.clone().unwrap_or_default().lease_expiry()?;
    // Opened from what the agent remembers of it when it cannot be reached, so that the
    // agent starts (and serves its mounts) through an outage.
    let (repo, away) = Repository::open_or_remembered(
        &location,
        &file.repository.clone().unwrap_or_default(),
        &state.join(REMEMBERED_REPOSITORY),
    )
    .await?;
    if let Some(e) = away {
        tracing::error!(repository = %location, error = %e, "the repository cannot be reached: starting from what this agent remembers of it; mounts are served from their kept copies, and reads that miss the caches wait for the repository (up to store_outage_grace each)");
    }
    let mut repo = repo.with_lease_expiry(lease_expiry);
    if let Some(slow) = &file.slow_repository {
        let how = Slowness::parse(slow.latency.as_deref(), slow.bandwidth.as_deref())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tracing::warn!(latency = ?how.latency, bandwidth = ?how.bandwidth, "repository reads slowed on purpose ([slow_repository] in the config)");
        repo = repo.slowed(how);
    }
    let advertise = a.advertise.or(file.advertise).unwrap_or_else(|| {
        if nfs_addr.ip().is_unspecified() {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".into())
        } else {
            nfs_addr.ip().to_string()
        }
    });
    let export = format!("/{}", export.trim_matches('/'));
    let datastore = Datastore {
        host: advertise.clone(),
        export: export.clone(),
    };
    let grace = match a
        .store_outage_grace
        .as_ref()
        .or(file.store_outage_grace.as_ref())
    {
        None => crate::cache::outage::DEFAULT_GRACE,
        Some(t) => {
            let d = parse_duration(t).map_err(|e| {
                anyhow::anyhow!("--store-outage-grace {t:?}: {e} (try \"120s\" or \"5m\")")
            })?;
            if d > crate::cache::outage::MAX_GRACE {
                anyhow::bail!(
                    "--store-outage-grace {t:?} is above {} s: a read held that long ties up a client's request for longer than any hypervisor waits",
                    crate::cache::outage::MAX_GRACE.as_secs()
                );
            }
            d
        }
    };
    let read_ahead = file.read_ahead.unwrap_or(true);
    if !read_ahead {
        tracing::warn!("read-ahead is off (read_ahead = false in the config)");
    }
    let disk_cache = match disk_cache {
        None => None,
        Some((dir, size)) => {
            let started = std::time::Instant::now();
            let d = tokio::task::spawn_blocking(move || DiskCache::open(&dir, size)).await??;
            let st = d.stats();
            tracing::info!(
                dir = %d.dir().display(), entries = st.entries, bytes = st.bytes, capacity = size,
                seconds = started.elapsed().as_secs_f64(),
                "disk cache opened"
            );
            Some(d)
        }
    };
    let agent = Arc::new(
        Agent::open(
            repo,
            datastore,
            &state,
            cache_bytes,
            disk_cache,
            learning,
            read_ahead,
        )
        .await?,
    );
    if let Err(e) = agent
        .repo()
        .remember(&state.join(REMEMBERED_REPOSITORY))
        .await
    {
        tracing::warn!(error = %e, "what this agent knows of its repository is not written: it cannot start while the repository is unreachable");
    }
    agent.cache().health().set_grace(grace);
    agent.set_default_network_map(file.network_map.clone().unwrap_or_default())?;
    agent.set_allow_list(allow.clone());
    agent.resume_relocations(relocate_roots).await?;
    agent.start_history();
    let identity = Identity::load(&state).with_context(|| {
        format!(
            "state directory {}: cannot load the datastore identity",
            state.display()
        )
    })?;
    if !identity.resumed {
        tracing::info!("new write verifier: clients resend writes they have not seen committed");
    }
    let fs = Arc::new(
        DatastoreFs::new(
            agent.clone(),
            file.allow_auth_none.unwrap_or(false),
            identity.clone(),
        )
        .with_root_squash(file.root_squash.unwrap_or(false)),
    );
    let nfs = NfsServer::bind(nfs_addr, fs, allow.clone())
        .await
        .with_context(|| format!("cannot listen for NFS on {nfs_addr}"))?
        .with_call_memory(call_memory);
    let nfs_port = nfs.local_addr()?.port();
    let undrained = nfs.undrained();
    let nbd = match nbd_addr {
        None => None,
        Some(addr) => {
            let exports = Arc::new(DatastoreExports::new(DatastoreCore::new(agent.clone())));
            let server = NbdServer::bind(addr, exports, allow.clone())
                .await
                .with_context(|| format!("cannot listen for NBD on {addr} (--nbd)"))?;
            Some(server)
        }
    };
    let nbd_port = nbd
        .as_ref()
        .map(|n| n.local_addr())
        .transpose()?
        .map(|a| a.port());
    std::fs::create_dir_all(&state)?;
    let chap_key = match iscsi_chap {
        true => Some(control::load_or_create_chap_key(&state)?),
        false => None,
    };
    let iscsi = match iscsi_addr {
        None => None,
        Some(addr) => {
            let targets = Arc::new(DatastoreTargets::new(
                DatastoreCore::new(agent.clone()),
                chap_key,
            ));
            let server = IscsiServer::bind(addr, targets, allow.clone())
                .await
                .with_context(|| format!("cannot listen for iSCSI on {addr} (--iscsi)"))?;
            Some(server)
        }
    };
    let iscsi_port = iscsi
        .as_ref()
        .map(|n| n.local_addr())
        .transpose()?
        .map(|a| a.port());

    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let portmap_on = portmap_addr.is_some();
    if let Some(addr) = portmap_addr {
        let mappings = [(100_003, 3), (100_005, 3), (100_005, 1)]
            .into_iter()
            .map(|(prog, vers)| Mapping {
                prog,
                vers,
                prot: 6,
                port: nfs_port,
            })
            .collect();
        let pm = Portmapper::bind(addr, mappings, allow.clone())
            .await
            .with_context(|| {
                format!("cannot listen for the portmapper on {addr} (is rpcbind running? stop it, or pass --portmap off)")
            })?;
        tasks.spawn(pm.run(cancel.child_token(), tasks.clone()));
    }

    let token = control::load_or_create_token(&state)?;
    let api_listener = tokio::net::TcpListener::bind(api_addr)
        .await
        .with_context(|| format!("cannot listen for the control API on {api_addr}"))?;
    let api_url = format!("http://{}", api_listener.local_addr()?);
    if !api_addr.ip().to_canonical().is_loopback() {
        let warning = format!(
            "the control API listens on {api_addr}, beyond loopback, over plain HTTP: its bearer \
             token and replies cross the network unencrypted; keep it on 127.0.0.1 and reach \
             it through a tunnel or a TLS proxy"
        );
        eprintln!("warning: {warning}");
        tracing::warn!("{warning}");
    }
    let addr_file = ApiAddr {
        url: api_url.clone(),
        pid: std::process::id(),
    };
    // Replaced whole: a CLI that reads it meanwhile never sees half of it.
    let (path, bytes) = (
        state.join(control::ADDR_FILE),
        serde_json::to_vec_pretty(&addr_file)?,
    );
    tokio::task::spawn_blocking(move || durable::replace(&path, &bytes)).await??;
    let api_state = ApiState {
        agent: agent.clone(),
        token: Arc::new(token),
        advertise: advertise.clone(),
        export: export.clone(),
        nfs_port,
        portmap: portmap_on,
        nbd_port,
        iscsi_port,
        chap_key,
        metrics_public: file.metrics_public.unwrap_or(false),
        changes: TaskTracker::new(),
        sessions: Default::default(),
    };
    tasks.spawn({
        let cancel = cancel.child_token();
        async move {
            if let Err(e) = control::serve_api(api_listener, api_state, cancel).await {
                tracing::error!(error = %e, "control API stopped");
            }
        }
    });
    tasks.spawn(nfs.run(cancel.child_token(), tasks.clone()));
    if let Some(nbd) = nbd {
        tasks.spawn(nbd.run(cancel.child_token(), tasks.clone()));
    }
    if let Some(iscsi) = iscsi {
        tasks.spawn(iscsi.run(cancel.child_token(), tasks.clone()));
    }

    let nbd_text = match (nbd_addr, nbd_port) {
        (Some(a), Some(p)) => format!("{}:{p}", a.ip()),
        _ => "off".into(),
    };
    let iscsi_text = match (iscsi_addr, iscsi_port) {
        (Some(a), Some(p)) if iscsi_chap => format!("{}:{p} (CHAP)", a.ip()),
        (Some(a), Some(p)) => format!("{}:{p}", a.ip()),
        _ => "off".into(),
    };
    println!(
        "livemount serving {} mounts from {}: NFS {}:{nfs_port}{export}, portmapper {portmap}, NBD {nbd_text}, iSCSI {iscsi_text}, API {api_url}",
        agent.mounts().len(),
        location,
        nfs_addr.ip(),
    );
    if !nfs_addr.ip().is_loopback() && allow_items.is_empty() {
        println!("note: only loopback clients are allowed; pass --allow CIDR for your hypervisors");
    }
    // A service manager (systemd, Type=notify) learns that every port listens now. No
    // NOTIFY_SOCKET: nothing to tell. A manager that cannot be told is worth a warning only.
    let serving = format!("serving {} mounts", agent.mounts().len());
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&serving),
    ]);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("livemount: stopping");
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping: syncing every mount's writes"),
    ]);
    cancel.cancel();
    tasks.close();
    tasks.wait().await;
    // Relocations, pre-staging and boot windows end before the final sync: none of them may
    // write after it.
    if !agent.stop_tasks(std::time::Duration::from_secs(30)).await {
        tracing::warn!("background tasks still running 30 s into the stop; the sync goes ahead");
    }
    let _ = std::fs::remove_file(state.join(control::ADDR_FILE));
    // Nothing is serving now: make every acknowledged write durable, committed or not.
    agent
        .sync_all()
        .await
        .context("syncing the mounts' writes at stop")?;
    // Mounts outlive a stop (they come back at the next start): their lease stays and
    // expires by itself if this agent is gone for longer than lease_expiry.
    if agent.mounts().is_empty() {
        agent.release_lease().await;
    }
    if undrained.load(std::sync::atomic::Ordering::SeqCst) {
        tracing::warn!("some calls were aborted at the stop: the write verifier will change");
    } else {
        identity
            .mark_clean_stop(&state)
            .context("recording the clean stop")?;
    }
    println!("livemount: stopped; every mount's writes are on disk");
    Ok(ExitCode::SUCCESS)
}

/// Tells the service manager that started us (`NOTIFY_SOCKET`), if any.
/// The file in the state directory that remembers the repository's location and config.
const REMEMBERED_REPOSITORY: &str = "repository.toml";

fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot tell the service manager (NOTIFY_SOCKET)");
    }
}

/// A listening address as `--nbd` and `--iscsi` take it: `off`, `ADDR:PORT`, or an
/// address alone for the protocol's own port. `flag` names the setting in the error.
fn optional_listen(
    text: Option<&str>,
    flag: &str,
    default_port: u16,
) -> anyhow::Result<Option<SocketAddr>> {
    let Some(text) = text else {
        return Ok(None);
    };
    if text == "off" {
        return Ok(None);
    }
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(Some(a));
    }
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(Some(SocketAddr::new(ip, default_port))),
        Err(_) => anyhow::bail!(
            "{flag} {text:?}: give ADDR:PORT, an address alone (port {default_port}), or off"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// contrib/livemount.toml with every commented-out setting and section turned on.
    fn example_config_uncommented() -> String {
        include_str!("../../contrib/livemount.toml")
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if is_setting(rest) => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn is_setting(line: &str) -> bool {
        let key = line.split(" = ").next().unwrap_or("");
        let ident =
            |k: &str| !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
        (line.starts_with('[') && line.split(']').next().is_some_and(|k| ident(&k[1..])))
            || (line.contains(" = ")
                && (ident(key) || (key.starts_with('"') && key.ends_with('"'))))
    }

    #[test]
    fn the_example_config_names_every_setting_and_parses() {
        let text = example_config_uncommented();
        let c: ServeConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(c.repo.is_some() && c.repository.is_some() && c.slow_repository.is_some());
        assert!(c.profiles.is_some() && c.retention.is_some() && c.network_map.is_some());
        assert_eq!(c.state, Some(PathBuf::from("/var/lib/livemount")));
        // Every field of ServeConfig is in the file (this source file names them).
        let src = include_str!("serve.rs");
        let body = &src[src.find("pub struct ServeConfig {\n").unwrap() + 25..];
        let body = &body[..body.find("\n}").unwrap()];
        for field in body.lines().filter_map(|l| l.trim().strip_prefix("pub ")) {
            let name = field.split(':').next().unwrap();
            let set = format!("\n{name} = ");
            let section = format!("\n[{name}]");
            assert!(
                text.contains(&set) || text.contains(&section),
                "contrib/livemount.toml does not show the setting {name}"
            );
        }
    }

    #[test]
    fn listen_addresses_take_a_port_a_bare_address_or_off() {
        let p = |t| optional_listen(Some(t), "--nbd", 10809);
        assert_eq!(p("off").unwrap(), None);
        assert_eq!(optional_listen(None, "--nbd", 10809).unwrap(), None);
        assert_eq!(
            p("127.0.0.1:10900").unwrap(),
            Some("127.0.0.1:10900".parse().unwrap())
        );
        assert_eq!(
            p("0.0.0.0").unwrap(),
            Some("0.0.0.0:10809".parse().unwrap())
        );
        assert_eq!(p("[::1]").unwrap(), Some("[::1]:10809".parse().unwrap()));
        assert_eq!(p("::1").unwrap(), Some("[::1]:10809".parse().unwrap()));
        let e = p("nbd.example:1").unwrap_err().to_string();
        assert!(e.contains("--nbd") && e.contains("ADDR:PORT"), "{e}");
        assert!(p("127.0.0.1:99999").is_err());
    }
}
