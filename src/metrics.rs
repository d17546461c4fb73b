//! Metrics in the Prometheus text format, served on the control API's `/metrics`.
//!
//! Owns: the registry and every metric the agent exports (below). The per-mount counts of
//! cache hits, misses and fetch latency are made by the mount's reader
//! (`crate::mount::reader`); sampled values come in a [`Sample`] at scrape time.
//! Must not: decide anything, or know the parts it counts; metrics are only counted here and
//! read by scrapers.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `livemount_nfs_reads_total`, `livemount_nfs_read_bytes_total` | mount | NFS READs served and their bytes |
//! | `livemount_nfs_writes_total`, `livemount_nfs_write_bytes_total` | mount | NFS WRITEs and their bytes |
//! | `livemount_nfs_errors_total` | mount, disk | READs and WRITEs answered with an error, by backup disk (`disk="-"`: files the hypervisor made in the mount's folder, whose names a client chose and which never become label values); the log line names the file, offset and chunk |
//! | `livemount_cache_hits_total`, `livemount_cache_misses_total` | mount | chunk lookups in the read cache |
//! | `livemount_repo_fetch_seconds` | mount | histogram: time to fetch, decode and verify a missed chunk |
//! | `livemount_cache_bytes`, `livemount_mounts` | | cache fill, number of mounts (sampled at scrape) |
//! | `livemount_disk_cache_bytes`, `livemount_disk_cache_hits_total`, `livemount_disk_cache_dropped_total` | | the disk cache's fill, reads it served, damaged entries it dropped (brought up to date at scrape) |
//! | `livemount_repo_fetches_total`, `livemount_repo_fetched_bytes_total` | | chunk and manifest GETs (file reads) of the repository's store, and the stored bytes they returned (brought up to date at scrape) |
//! | `livemount_fetch_slots_busy`, `livemount_fetches_waiting` | | the fetch scheduler now (sampled) |
//! | `livemount_fetches_started_total` | class (`vm`, `prestage`, `background`) | fetches that got a scheduler slot, by class (brought up to date at scrape) |
//! | `livemount_fetches_joined_total` | | reads that found their chunk's fetch under way (for any mount or snapshot) and waited for it instead of fetching again (brought up to date at scrape) |
//! | `livemount_guest_files_cache_hits_total`, `livemount_guest_files_cache_misses_total` | | chunk lookups of guest file listings and downloads through the API: from the cache, or fetched (in the background class) |
//! | `livemount_boot_set_chunks`, `livemount_prestaged_chunks` | mount | the boot set being pre-staged, and how much of it is cached (sampled) |
//! | `livemount_boot_window_hits`, `livemount_boot_window_misses` | mount | the VM's chunk reads during its boot window, from the cache or not (sampled) |
//! | `livemount_boot_storage_wait_seconds` | mount | time during the boot window in which at least one VM read waited for a repository fetch (sampled) |
//! | `livemount_relocation_copied_bytes`, `livemount_relocation_total_bytes` | mount | a relocation's progress (sampled) |
//! | `livemount_relocation_bytes_per_second`, `livemount_relocation_eta_seconds` | mount | its speed over the last seconds and the time left at that speed (sampled) |
//! | `livemount_store_up`, `livemount_store_unreachable_seconds` | | 1 while the repository's store answers, 0 from a fetch that found it away until one succeeds; how long the current outage has lasted (0 when up) (sampled) |
//! | `livemount_store_held_reads`, `livemount_store_longest_held_seconds` | | VM reads waiting now for a fetch held through an outage, and the longest such wait (sampled) |
//! | `livemount_store_held_read_seconds` | | histogram: how long each held read waited, served or not (observed by the cache, `cache::outage`) |
//! | `livemount_store_outages_total` | | outages that ended since the server started (brought up to date at scrape) |

pub mod history;

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::repo::RepoStats;

/// The label of per-mount metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MountLabel {
    pub mount: String,
}

/// The labels of per-disk metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiskLabel {
    pub mount: String,
    pub disk: String,
}

/// The label of per-class metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: &'static str,
}

type Hist = Family<MountLabel, Histogram, fn() -> Histogram>;

fn fetch_histogram() -> Histogram {
    // 100 µs .. ~3.3 s: local disk to slow object storage.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// A label value that cannot break the text format: prometheus-client writes label values
/// as given, so anything but letters, digits and `._-+@:` becomes `_`. Mount and disk names are
/// checked when they are made; this is the second line.
fn label_value(v: &str) -> String {
    v.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-+@:".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Server-wide running totals of what the per-mount families count, for the console's
/// history ([`history`]): prometheus-client's families cannot be summed cheaply.
#[derive(Debug, Default)]
pub struct Totals {
    /// Bytes of NFS READs served, every mount.
    pub read_bytes: AtomicU64,
    /// Missed chunks a mount's reader fetched, and the nanoseconds they took in all.
    pub fetches: AtomicU64,
    pub fetch_nanos: AtomicU64,
}

impl Totals {
    /// Counts one NFS READ of `bytes`.
    pub fn on_read(&self, bytes: u64) {
        self.read_bytes.fetch_add(bytes, Relaxed);
    }

    /// Counts one fetch of a missed chunk that took `took`.
    pub fn on_fetch(&self, took: std::time::Duration) {
        self.fetches.fetch_add(1, Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.fetch_nanos.fetch_add(nanos, Relaxed);
    }
}

/// Every metric of the agent.
pub struct Metrics {
    registry: Registry,
    /// Running totals for the console's history.
    pub totals: Totals,
    pub reads: Family<MountLabel, Counter>,
    pub read_bytes: Family<MountLabel, Counter>,
    pub writes: Family<MountLabel, Counter>,
    pub write_bytes: Family<MountLabel, Counter>,
    pub errors: Family<DiskLabel, Counter>,
    pub hits: Family<MountLabel, Counter>,
    pub misses: Family<MountLabel, Counter>,
    pub fetch_seconds: Hist,
    pub guest_files_hits: Counter,
    pub guest_files_misses: Counter,
    fetches_started: Family<ClassLabel, Counter>,
    fetches_joined: Counter,
    cache_bytes: Gauge,
    repo_fetches: Counter,
    repo_fetched_bytes: Counter,
    disk_bytes: Gauge,
    disk_hits: Counter,
    disk_dropped: Counter,
    mounts: Gauge,
    slots_busy: Gauge,
    waiting: Gauge,
    boot_set: Family<MountLabel, Gauge>,
    prestaged: Family<MountLabel, Gauge>,
    window_hits: Family<MountLabel, Gauge>,
    window_misses: Family<MountLabel, Gauge>,
    storage_wait: Family<MountLabel, Gauge<f64, AtomicU64>>,
    reloc_copied: Family<MountLabel, Gauge>,
    reloc_total: Family<MountLabel, Gauge>,
    reloc_speed: Family<MountLabel, Gauge>,
    reloc_eta: Family<MountLabel, Gauge>,
    store_up: Gauge,
    store_down_seconds: Gauge<f64, AtomicU64>,
    store_held: Gauge,
    store_longest_held: Gauge<f64, AtomicU64>,
    store_outages: Counter,
}

/// Values read at scrape time.
#[derive(Debug, Default)]
pub struct Sample {
    pub cache_bytes: u64,
    pub repo: RepoStats,
    pub disk: Option<DiskSample>,
    pub mounts: usize,
    pub slots_busy: usize,
    pub waiting: usize,
    /// Fetches started by the scheduler, by class: VM, pre-stage, background.
    pub started: [u64; 3],
    /// Reads that joined a fetch under way.
    pub joined: u64,
    pub boots: Vec<BootSample>,
    pub relocations: Vec<RelocationSample>,
    pub store: crate::cache::outage::StoreState,
}

/// The disk cache, at scrape time.
#[derive(Debug, Default)]
pub struct DiskSample {
    pub bytes: u64,
    pub hits: u64,
    pub dropped: u64,
}

/// A relocation under way, at scrape time.
#[derive(Debug, Default)]
pub struct RelocationSample {
    pub mount: String,
    pub copied: u64,
    pub total: u64,
    pub bytes_per_second: f64,
    pub eta_seconds: Option<f64>,
}

/// A mount's boot, at scrape time.
#[derive(Debug, Default)]
pub struct BootSample {
    pub mount: String,
    pub boot_set: Option<(u64, u64)>,
    /// Hits, misses, seconds of storage wait.
    pub window: Option<(u64, u64, f64)>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_held_reads(Histogram::new(exponential_buckets(0.1, 2.0, 15)))
    }

    /// The metrics, with `held_reads` the histogram the cache observes held reads into.
    pub fn with_held_reads(held_reads: Histogram) -> Self {
        let mut registry = Registry::with_prefix("livemount");
        let m = Metrics {
            totals: Totals::default(),
            reads: Family::default(),
            read_bytes: Family::default(),
            writes: Family::default(),
            write_bytes: Family::default(),
            errors: Family::default(),
            hits: Family::default(),
            misses: Family::default(),
            fetch_seconds: Family::new_with_constructor(fetch_histogram as fn() -> Histogram),
            guest_files_hits: Counter::default(),
            guest_files_misses: Counter::default(),
            fetches_started: Family::default(),
            fetches_joined: Counter::default(),
            cache_bytes: Gauge::default(),
            repo_fetches: Counter::default(),
            repo_fetched_bytes: Counter::default(),
            disk_bytes: Gauge::default(),
            disk_hits: Counter::default(),
            disk_dropped: Counter::default(),
            mounts: Gauge::default(),
            slots_busy: Gauge::default(),
            waiting: Gauge::default(),
            boot_set: Family::default(),
            prestaged: Family::default(),
            window_hits: Family::default(),
            window_misses: Family::default(),
            storage_wait: Family::default(),
            reloc_copied: Family::default(),
            reloc_total: Family::default(),
            reloc_speed: Family::default(),
            reloc_eta: Family::default(),
            store_up: Gauge::default(),
            store_down_seconds: Gauge::default(),
            store_held: Gauge::default(),
            store_longest_held: Gauge::default(),
            store_outages: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("nfs_reads", "NFS READs served", m.reads.clone());
        registry.register(
            "nfs_read_bytes",
            "bytes returned by NFS READs",
            m.read_bytes.clone(),
        );
        registry.register("nfs_writes", "NFS WRITEs taken", m.writes.clone());
        registry.register(
            "nfs_write_bytes",
            "bytes taken by NFS WRITEs",
            m.write_bytes.clone(),
        );
        registry.register(
            "nfs_errors",
            "NFS READs and WRITEs answered with an error",
            m.errors.clone(),
        );
        registry.register(
            "cache_hits",
            "chunk lookups served by the read cache",
            m.hits.clone(),
        );
        registry.register(
            "cache_misses",
            "chunk lookups that fetched from the repository",
            m.misses.clone(),
        );
        registry.register(
            "repo_fetch_seconds",
            "time to fetch, decode and verify a missed chunk",
            m.fetch_seconds.clone(),
        );
        registry.register(
            "cache_bytes",
            "bytes in the read cache",
            m.cache_bytes.clone(),
        );
        registry.register(
            "repo_fetches",
            "chunk and manifest GETs (file reads) of the repository's store",
            m.repo_fetches.clone(),
        );
        registry.register(
            "repo_fetched_bytes",
            "stored bytes the repository's store returned",
            m.repo_fetched_bytes.clone(),
        );
        registry.register(
            "disk_cache_bytes",
            "bytes in the disk cache",
            m.disk_bytes.clone(),
        );
        registry.register(
            "disk_cache_hits",
            "chunk reads served from the disk cache",
            m.disk_hits.clone(),
        );
        registry.register(
            "disk_cache_dropped",
            "disk cache entries dropped because their bytes did not match their digest",
            m.disk_dropped.clone(),
        );
        registry.register("mounts", "live mounts", m.mounts.clone());
        registry.register(
            "fetch_slots_busy",
            "repository fetches running now",
            m.slots_busy.clone(),
        );
        registry.register(
            "fetches_waiting",
            "repository fetches waiting for a slot",
            m.waiting.clone(),
        );
        registry.register(
            "fetches_started",
            "repository fetches that got a scheduler slot, by class",
            m.fetches_started.clone(),
        );
        registry.register(
            "fetches_joined",
            "reads that waited for their chunk's fetch under way instead of fetching it again",
            m.fetches_joined.clone(),
        );
        registry.register(
            "guest_files_cache_hits",
            "chunk lookups of guest file listings and downloads served by the cache",
            m.guest_files_hits.clone(),
        );
        registry.register(
            "guest_files_cache_misses",
            "chunk lookups of guest file listings and downloads that fetched (background class)",
            m.guest_files_misses.clone(),
        );
        registry.register(
            "boot_set_chunks",
            "chunks in the boot set being pre-staged",
            m.boot_set.clone(),
        );
        registry.register(
            "prestaged_chunks",
            "chunks of the boot set dealt with so far (fetched, cached already or failed)",
            m.prestaged.clone(),
        );
        registry.register(
            "boot_window_hits",
            "the VM's chunk reads from the cache during its boot window",
            m.window_hits.clone(),
        );
        registry.register(
            "boot_window_misses",
            "the VM's chunk reads that waited for the repository during its boot window",
            m.window_misses.clone(),
        );
        registry.register(
            "boot_storage_wait_seconds",
            "time in the boot window during which at least one VM read waited for a repository fetch",
            m.storage_wait.clone(),
        );
        registry.register(
            "relocation_copied_bytes",
            "bytes of the mount's disks copied to primary storage",
            m.reloc_copied.clone(),
        );
        registry.register(
            "relocation_total_bytes",
            "bytes of the mount's disks to copy",
            m.reloc_total.clone(),
        );
        registry.register(
            "relocation_bytes_per_second",
            "the relocation's copy speed over the last seconds",
            m.reloc_speed.clone(),
        );
        registry.register(
            "relocation_eta_seconds",
            "time left for the copy at its current speed",
            m.reloc_eta.clone(),
        );
        registry.register(
            "store_up",
            "1 while the repository's store answers, 0 during an outage",
            m.store_up.clone(),
        );
        registry.register(
            "store_unreachable_seconds",
            "how long the current outage of the repository's store has lasted (0 when it answers)",
            m.store_down_seconds.clone(),
        );
        registry.register(
            "store_held_reads",
            "VM reads waiting now for a fetch held through an outage of the store",
            m.store_held.clone(),
        );
        registry.register(
            "store_longest_held_seconds",
            "the longest wait of a read held now",
            m.store_longest_held.clone(),
        );
        registry.register(
            "store_held_read_seconds",
            "how long each read held through an outage waited, served or not",
            held_reads,
        );
        registry.register(
            "store_outages",
            "outages of the repository's store that ended since the server started",
            m.store_outages.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition, with the sampled gauges brought up to date.
    pub fn render(&self, s: &Sample) -> String {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.cache_bytes.set(g(s.cache_bytes));
        // Counters kept by the repository: bring ours up to its count.
        let catch_up = |c: &Counter, now: u64| c.inc_by(now.saturating_sub(c.get()));
        catch_up(&self.repo_fetches, s.repo.fetches);
        catch_up(&self.repo_fetched_bytes, s.repo.fetched_bytes);
        if let Some(d) = &s.disk {
            self.disk_bytes.set(g(d.bytes));
            catch_up(&self.disk_hits, d.hits);
            catch_up(&self.disk_dropped, d.dropped);
        }
        self.mounts.set(g(s.mounts as u64));
        let st = &s.store;
        self.store_up.set(i64::from(st.reachable));
        let down = st
            .unreachable_since
            .map(|t| jiff::Timestamp::now().duration_since(t).as_secs_f64());
        self.store_down_seconds.set(down.unwrap_or(0.0).max(0.0));
        self.store_held.set(g(st.held_reads));
        self.store_longest_held.set(st.longest_held_seconds);
        catch_up(&self.store_outages, st.outages);
        self.slots_busy.set(g(s.slots_busy as u64));
        self.waiting.set(g(s.waiting as u64));
        catch_up(&self.fetches_joined, s.joined);
        for (class, n) in ["vm", "prestage", "background"].into_iter().zip(s.started) {
            catch_up(
                &self.fetches_started.get_or_create(&ClassLabel { class }),
                n,
            );
        }
        for f in [
            &self.boot_set,
            &self.prestaged,
            &self.window_hits,
            &self.window_misses,
            &self.reloc_copied,
            &self.reloc_total,
            &self.reloc_speed,
            &self.reloc_eta,
        ] {
            f.clear(); // mounts that went away leave no stale series
        }
        self.storage_wait.clear();
        for b in &s.boots {
            let l = Self::label(&b.mount);
            if let Some((set, done)) = b.boot_set {
                self.boot_set.get_or_create(&l).set(g(set));
                self.prestaged.get_or_create(&l).set(g(done));
            }
            if let Some((hits, misses, wait)) = b.window {
                self.window_hits.get_or_create(&l).set(g(hits));
                self.window_misses.get_or_create(&l).set(g(misses));
                self.storage_wait.get_or_create(&l).set(wait);
            }
        }
        for r in &s.relocations {
            let l = Self::label(&r.mount);
            self.reloc_copied.get_or_create(&l).set(g(r.copied));
            self.reloc_total.get_or_create(&l).set(g(r.total));
            self.reloc_speed
                .get_or_create(&l)
                .set(r.bytes_per_second.round() as i64);
            if let Some(eta) = r.eta_seconds {
                self.reloc_eta.get_or_create(&l).set(eta.ceil() as i64);
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn label(mount: &str) -> MountLabel {
        MountLabel {
            mount: label_value(mount),
        }
    }

    /// The label of a backup disk of a mount; `None`: a file of the mount's folder (its name
    /// was chosen by a client, so it is not a label value).
    pub fn disk_label(mount: &str, disk: Option<&str>) -> DiskLabel {
        DiskLabel {
            mount: label_value(mount),
            disk: disk.map_or_else(|| "-".to_string(), label_value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_metric_with_its_mount_label() {
        let m = Metrics::new();
        let l = Metrics::label("web01-lm1");
        m.reads.get_or_create(&l).inc();
        m.read_bytes.get_or_create(&l).inc_by(4096);
        m.fetch_seconds.get_or_create(&l).observe(0.002);
        let mut sample = Sample {
            cache_bytes: 123,
            repo: RepoStats {
                fetches: 7,
                fetched_bytes: 7 << 20,
            },
            disk: Some(DiskSample {
                hits: 3,
                dropped: 1,
                bytes: 4096,
            }),
            mounts: 1,
            slots_busy: 2,
            waiting: 5,
            started: [7, 0, 3],
            joined: 4,
            boots: vec![BootSample {
                mount: "web01-lm1".into(),
                boot_set: Some((40, 12)),
                window: Some((30, 3, 1.5)),
            }],
            relocations: vec![RelocationSample {
                mount: "web01-lm1".into(),
                copied: 1 << 20,
                total: 4 << 20,
                bytes_per_second: 1e6,
                eta_seconds: Some(3.1),
            }],
            store: crate::cache::outage::StoreState {
                reachable: false,
                unreachable_since: Some(
                    jiff::Timestamp::now() - jiff::SignedDuration::from_secs(40),
                ),
                held_reads: 3,
                longest_held_seconds: 12.5,
                outages: 2,
                ..Default::default()
            },
        };
        let text = m.render(&sample);
        for needle in [
            "livemount_fetch_slots_busy 2",
            "livemount_fetches_waiting 5",
            "livemount_fetches_started_total{class=\"vm\"} 7",
            "livemount_fetches_started_total{class=\"background\"} 3",
            "livemount_fetches_joined_total 4",
            "livemount_boot_set_chunks{mount=\"web01-lm1\"} 40",
            "livemount_prestaged_chunks{mount=\"web01-lm1\"} 12",
            "livemount_boot_window_hits{mount=\"web01-lm1\"} 30",
            "livemount_boot_window_misses{mount=\"web01-lm1\"} 3",
            "livemount_boot_storage_wait_seconds{mount=\"web01-lm1\"} 1.5",
            "livemount_nfs_reads_total{mount=\"web01-lm1\"} 1",
            "livemount_nfs_read_bytes_total{mount=\"web01-lm1\"} 4096",
            "livemount_repo_fetch_seconds_count{mount=\"web01-lm1\"} 1",
            "livemount_cache_bytes 123",
            "livemount_repo_fetches_total 7",
            "livemount_disk_cache_bytes 4096",
            "livemount_disk_cache_hits_total 3",
            "livemount_disk_cache_dropped_total 1",
            "livemount_repo_fetched_bytes_total 7340032",
            "livemount_mounts 1",
            "livemount_relocation_copied_bytes{mount=\"web01-lm1\"} 1048576",
            "livemount_relocation_total_bytes{mount=\"web01-lm1\"} 4194304",
            "livemount_relocation_bytes_per_second{mount=\"web01-lm1\"} 1000000",
            "livemount_relocation_eta_seconds{mount=\"web01-lm1\"} 4",
            "livemount_store_up 0",
            "livemount_store_unreachable_seconds 40.",
            "livemount_store_held_reads 3",
            "livemount_store_longest_held_seconds 12.5",
            "livemount_store_outages_total 2",
            "livemount_store_held_read_seconds_count 0",
            "# EOF",
        ] {
            assert!(text.contains(needle), "missing {needle}:\n{text}");
        }
        sample.boots.clear();
        sample.relocations.clear();
        let text = m.render(&sample);
        assert!(
            !text.contains("boot_set_chunks{"),
            "a gone mount leaves no series:\n{text}"
        );
        assert!(!text.contains("relocation_copied_bytes{"), "{text}");
    }
}
