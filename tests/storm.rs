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
