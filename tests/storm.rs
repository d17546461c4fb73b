//! Many VMs from one template at once (issue 24): a chunk that several mounts read at the same
//! moment is fetched once, whatever mount or snapshot asks, and counted so: through the store
//! (`livemount_repo_fetches_total`) and as joined fetches (`livemount_fetches_joined_total`).

mod common;

use std::collections::HashSet;

use common::*;

/// The value of the metric line `name` (no labels) in a `/metrics` text.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

#[test]
fn two_mounts_reading_one_uncached_chunk_at_once_cause_one_get() {
    let t = tempfile::tempdir().unwrap();
    // A template's disk and a clone's: the same but for one chunk of its own.
    let template = mixed_disk(6 * MIB, 24);
    let mut clone = template.clone();
    clone[(3 * MIB + 4096) as usize..(3 * MIB + 8192) as usize].fill(0x5c);
    let unique: HashSet<&[u8]> = template
        .chunks(MIB as usize)
        .chain(clone.chunks(MIB as usize))
        .filter(|c| c.iter().any(|b| *b != 0))
        .collect();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    write(&a.join("d.img"), &template);
    write(&b.join("d.img"), &clone);
    let repo = repo_with_backup(&a, &kvm_config(&a, "tmpl", &[("d.img", "raw")]));
    let cfg = kvm_config(&b, "clone1", &[("d.img", "raw")]);
    livemount_ok(&[
        "backup",
        "--repo",
        repo.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    // Slow fetches and no read-ahead: the two readers surely ask for each chunk while its
    // fetch is under way.
    let config = t.path().join("serve.toml");
    std::fs::write(
        &config,
        "read_ahead = false\n[slow_repository]\nlatency = \"300ms\"\n",
    )
    .unwrap();
    let server = Server::start(
        &repo,
        &t.path().join("state"),
        "off",
        &["--config", config.to_str().unwrap()],
    );
    server.cli(&["mount", "tmpl", "--name", "t1"]);
    server.cli(&["mount", "clone1", "--name", "c1"]);
    let before = server.metrics();
    let readers: Vec<_> = [("t1", &template), ("c1", &clone)]
        .into_iter()
        .map(|(m, want)| {
            let url = server.libnfs_url(&format!("{m}/d.img"));
            let want = want.clone();
            std::thread::spawn(move || {
                let out = client("nfs-cat", &[&url]);
                assert!(out.status.success(), "{}", output_text(&out));
                assert!(out.stdout == want, "{url}: other bytes");
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    let after = server.metrics();
    let gets = metric(&after, "livemount_repo_fetches_total")
        - metric(&before, "livemount_repo_fetches_total");
    let joined = metric(&after, "livemount_fetches_joined_total")
        - metric(&before, "livemount_fetches_joined_total");
    eprintln!(
        "{} unique chunks, {gets} GETs, {joined} reads joined a fetch",
        unique.len()
    );
    assert_eq!(gets, unique.len() as u64, "one GET per unique chunk");
    assert!(joined >= 1, "the readers shared fetches");
    let status = server.cli(&["status"]);
    assert!(status.contains("fetches joined"), "{status}");
}

/// The storm at N = 20 (issue 24, the CI size): twenty VMs cloned from one template, each with
/// one block of its own, mounted at once by a recovery plan and booted at once by replaying
/// the recorded boot (its first 200 reads, gaps shortened tenfold) through a real NFS client
/// each, over a store slowed to 20 ms a fetch. Every chunk of the boot sets is fetched once
/// however many VMs read it: GETs at most 1.05 times the unique chunks (the target),
/// and the reads that found a fetch under way are counted as joined. Timing is reported, not
/// asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_twenty_clones_fetches_each_boot_chunk_once() {
    const N: usize = 20;
    const CHUNK: u64 = 256 * 1024;
    const SIZE: u64 = 32 * MIB;
    let t = tempfile::tempdir().unwrap();
    let mut template = vec![0u8; SIZE as usize];
    Rng::new(2024).fill(&mut template);
    let trace = common::replay::shrink(&common::replay::boot_trace(), 200, SIZE, 0.1);
    let touched = common::replay::blocks(&trace, CHUNK);
    let mut disks = Vec::new();
    let mut unique = HashSet::new();
    let mut repo = None;
    for i in 0..N {
        // A clone's own block: one of those its boot reads, for half of them, so that the
        // boot sets differ.
        let mut disk = template.clone();
        if i > 0 {
            let b = if i % 2 == 0 {
                *touched.iter().nth(i % touched.len()).unwrap()
            } else {
                (SIZE / CHUNK - 1) - i as u64
            };
            Rng::new(i as u64).fill(&mut disk[(b * CHUNK) as usize..((b + 1) * CHUNK) as usize]);
        }
        for b in &touched {
            unique.insert(blake3::hash(
                &disk[(b * CHUNK) as usize..((b + 1) * CHUNK) as usize],
            ));
        }
        let dir = t.path().join(format!("vm{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        write(&dir.join("d.img"), &disk);
        let cfg = kvm_config(&dir, &format!("vm{i:02}"), &[("d.img", "raw")]);
        match &repo {
            None => repo = Some(repo_with_backup_chunks(t.path(), &cfg, "256KiB")),
            Some(r) => {
                livemount_ok(&[
                    "backup",
                    "--repo",
                    r.to_str().unwrap(),
                    "--config",
                    cfg.to_str().unwrap(),
                ]);
            }
        }
        disks.push(disk);
    }
    let repo = repo.unwrap();
    let config = t.path().join("serve.toml");
    std::fs::write(
        &config,
        "read_ahead = false\n[slow_repository]\nlatency = \"20ms\"\n",
    )
    .unwrap();
    let server = Server::start(
        &repo,
        &t.path().join("state"),
        "off",
        &["--config", config.to_str().unwrap()],
    );
    // All at once: one group of a recovery plan.
    let mut plan = String::from("wait = \"0s\"\n");
    for i in 0..N {
        plan.push_str(&format!(
            "[[vm]]\nvm = \"vm{i:02}\"\nname = \"s{i:02}\"\ngroup = 1\n"
        ));
    }
    let plan_file = t.path().join("storm.toml");
    std::fs::write(&plan_file, plan).unwrap();
    server.cli(&["plan", "apply", plan_file.to_str().unwrap(), "--json"]);

    let before = server.metrics();
    let started = std::time::Instant::now();
    let mut vms = Vec::new();
    for i in 0..N {
        let mut c = common::nfs::connect(&server, &format!("s{i:02}")).await;
        let root = c.root_nfs_fh3();
        let fh = common::nfs::lookup(&mut c, &root, "d.img").await.unwrap();
        let trace = trace.clone();
        vms.push(tokio::spawn(async move {
            common::replay::replay(&mut c, &fh, &trace).await
        }));
    }
    let mut waits = Vec::new();
    for v in vms {
        waits.push(v.await.unwrap().wait);
    }
    let took = started.elapsed();
    let after = server.metrics();
    let gets = metric(&after, "livemount_repo_fetches_total")
        - metric(&before, "livemount_repo_fetches_total");
    let joined = metric(&after, "livemount_fetches_joined_total")
        - metric(&before, "livemount_fetches_joined_total");
    waits.sort();
    eprintln!(
        "storm N={N}: {} unique boot chunks, {gets} GETs, {joined} joined; storage wait per VM \
         p50 {:?}, max {:?}; {took:?} in all",
        unique.len(),
        waits[N / 2],
        waits[N - 1]
    );
    assert!(
        gets as f64 <= unique.len() as f64 * 1.05,
        "{gets} GETs for {} unique chunks",
        unique.len()
    );
    assert!(
        gets as usize >= unique.len(),
        "every unique chunk is fetched"
    );
    assert!(joined > 0, "the VMs shared fetches");
}
