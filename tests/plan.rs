//! Recovery plans against a real `livemount serve`: a bad plan mounts nothing and names each
//! bad entry; a plan applied twice changes nothing the second time; groups are mounted in
//! order; a mount that fails mid-plan stops it there; `plan status` shows every entry.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A repository in `dir/repo` with one backup of each KVM VM in `vms` (a 4 MiB disk each).
fn repo_with_vms(dir: &Path, vms: &[&str]) -> PathBuf {
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap();
    livemount_ok(&["repo", "init", r, "--chunk-size", "256KiB"]);
    for (i, vm) in vms.iter().enumerate() {
        let sub = dir.join(vm);
        std::fs::create_dir_all(&sub).unwrap();
        write(&sub.join("d.img"), &mixed_disk(4 * MIB, 100 + i as u64));
        let cfg = kvm_config(&sub, vm, &[("d.img", "raw")]);
        livemount_ok(&["backup", "--repo", r, "--config", cfg.to_str().unwrap()]);
    }
    repo
}

/// A server whose boot windows end after 1 s without a new block.
fn start(dir: &Path, repo: &Path, extra: &[&str]) -> Server {
    let config = dir.join("serve.toml");
    write(&config, b"[profiles]\nquiet = \"1s\"\n");
    let mut args = vec!["--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::start(repo, &dir.join("state"), "off", &args)
}

fn plan_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    write(&path, text.as_bytes());
    path
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// `livemount plan ARGS --state ...`, failing or not.
fn plan_cmd(server: &Server, args: &[&str]) -> std::process::Output {
    let mut a = vec!["plan"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--state", server.state.to_str().unwrap()]);
    livemount(&a)
}

fn status(server: &Server, plan: &Path) -> Value {
    json(&server.cli(&["plan", "status", plan.to_str().unwrap(), "--json"]))
}

/// The mounts by name: (id, created).
fn mounts(server: &Server) -> BTreeMap<String, (u64, String)> {
    let all = json(&server.cli(&["mounts", "--json"]));
    all.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let s = &m["spec"];
            (
                s["name"].as_str().unwrap().to_owned(),
                (
                    s["id"].as_u64().unwrap(),
                    s["created"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect()
}

fn entry<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no entry {name}: {st}"))
}

/// Polls `plan status` until `done` says so (at most 60 s).
fn wait_for(server: &Server, plan: &Path, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let st = status(server, plan);
        if done(&st) {
            return st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what} not seen in 60 s: {st}\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_ended(st: &Value) -> bool {
    st["run"]["phase"].as_str().is_some_and(|p| p != "running")
}

fn fetches(server: &Server) -> u64 {
    json(&server.cli(&["status", "--json"]))["repository_fetches"]["fetches"]
        .as_u64()
        .unwrap()
}

/// Reads the whole disk of mount `name` over NFS (its VM "boots").
fn read_disk(server: &Server, name: &str) {
    let all = json(&server.cli(&["mounts", "--json"]));
    let m = all
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["spec"]["name"] == name)
        .unwrap();
    let disk = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["disk"] == true)
        .unwrap();
    let size = disk["size"].as_u64().unwrap();
    let data = common::nfs::read_file(server, name, disk["name"].as_str().unwrap(), size);
    assert_eq!(data.len() as u64, size);
}

#[test]
fn a_plan_with_a_bad_entry_mounts_nothing_and_names_each_bad_entry() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_vms(t.path(), &["db01", "web01"]);
    let server = start(t.path(), &repo, &[]);
    server.cli(&["mount", "web01", "--name", "taken"]);
    let plan = plan_file(
        t.path(),
        "bad.toml",
        r#"
wait = "1s"
[[vm]]
vm = "db01"
name = "db01-dr"
[[vm]]
vm = "nosuch"
name = "nosuch-dr"
group = 2
[[vm]]
vm = "web01"
name = "db01-dr"
[[vm]]
vm = "web01"
name = "web01-dr"
allow = ["10.9.0.0/16"]
[[vm]]
vm = "db01"
name = "taken"
[[vm]]
vm = "db01"
name = "zero"
group = 0
[[vm]]
vm = "db01"
name = "bad/name"
[[vm]]
vm = "db01"
snapshot = "web01@2026-01-01T00:00:00Z"
name = "other-vm"
"#,
    );
    let out = plan_cmd(&server, &["apply", plan.to_str().unwrap()]);
    let err = output_text(&out);
    assert!(!out.status.success(), "{err}");
    for want in [
        "the plan was refused and nothing was mounted",
        "entry 2 (vm nosuch, name nosuch-dr): ",
        "entry 3 (vm web01, name db01-dr): the name db01-dr is used by entry 1 too",
        "entry 4 (vm web01, name web01-dr): allow \"10.9.0.0/16\" is not within the server's --allow list (127.0.0.0/8, ::1/128)",
        "entry 5 (vm db01, name taken): a mount named taken exists",
        "with VM web01, not db01; unmount it (`livemount unmount taken`)",
        "entry 6 (vm db01, name zero): group = 0: groups are numbered from 1",
        "entry 7 (vm db01, name bad/name): mount name \"bad/name\" is not valid",
        "entry 8 (vm db01, name other-vm): ",
    ] {
        assert!(err.contains(want), "{want:?} not in:\n{err}");
    }
    assert!(!err.contains("entry 1 ("), "entry 1 is good:\n{err}");
    let only_taken = |server: &Server| {
        assert_eq!(
            mounts(server).keys().collect::<Vec<_>>(),
            ["taken"],
            "something was mounted"
        )
    };
    only_taken(&server);

    // A key the plan does not know: refused before the server sees it, naming the entry.
    let plan = plan_file(
        t.path(),
        "typo.toml",
        "[[vm]]\nvm = \"db01\"\nname = \"db01-dr\"\n[[vm]]\nvm = \"web01\"\nname = \"web01-dr\"\nreadonly = true\n",
    );
    let out = plan_cmd(&server, &["apply", plan.to_str().unwrap()]);
    let err = output_text(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("entry 2 (vm web01, name web01-dr): unknown field `readonly`"),
        "{err}"
    );

    // An empty plan; a name mounted already with other options.
    let plan = plan_file(t.path(), "empty.toml", "wait = \"1s\"\n");
    let out = plan_cmd(&server, &["apply", plan.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("no [[vm]] entries"),
        "{}",
        output_text(&out)
    );
    let plan = plan_file(
        t.path(),
        "options.toml",
        "[[vm]]\nvm = \"web01\"\nname = \"taken\"\nread_only = true\nnetwork = \"keep\"\n",
    );
    let out = plan_cmd(&server, &["apply", plan.to_str().unwrap()]);
    let err = output_text(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("entry 1 (vm web01, name taken): a mount named taken exists (web01@")
            && err.contains("with other options: read_only = false, network = \"disconnect\""),
        "{err}"
    );
    only_taken(&server);
}

#[test]
fn a_plan_applied_twice_changes_nothing_the_second_time() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_vms(t.path(), &["db01", "web01", "app01"]);
    let cache = t.path().join("disk-cache");
    let server = start(
        t.path(),
        &repo,
        &[
            "--cache-dir",
            cache.to_str().unwrap(),
            "--cache-disk-size",
            "256MiB",
        ],
    );
    // web01 boots once, so that it has a boot profile for the plan to warm.
    server.cli(&["mount", "web01", "--name", "probe"]);
    read_disk(&server, "probe");
    let t0 = Instant::now();
    while !std::fs::exists(server.state.join("profiles/web01.json")).unwrap() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no profile of web01"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    server.cli(&["unmount", "probe"]);

    let plan = plan_file(
        t.path(),
        "plan.toml",
        r#"
wait = "2s"
[[vm]]
vm = "db01"
name = "db01-dr"
group = 1
[[vm]]
vm = "web01"
name = "web01-dr"
group = 2
[[vm]]
vm = "app01"
snapshot = "latest"
name = "app01-dr"
group = 2
read_only = true
"#,
    );
    let p = plan.to_str().unwrap();
    server.cli(&["plan", "apply", p, "--no-wait"]);
    // While group 1 boots, group 2's boot set warms, before group 2 is mounted.
    let st = wait_for(&server, &plan, "web01-dr warming", |st| {
        let e = entry(st, "web01-dr");
        !e["prestage"].is_null() || e["state"] != "not_mounted"
    });
    let web = entry(&st, "web01-dr");
    assert!(
        web["state"] == "prestaging" || web["state"] == "not_mounted",
        "{st}"
    );
    assert!(web["prestage"]["chunks"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(entry(&st, "db01-dr")["state"], "mounted", "{st}");
    let first = wait_for(&server, &plan, "the run's end", run_ended);
    assert_eq!(first["run"]["phase"], "done", "{first}");
    for e in first["entries"].as_array().unwrap() {
        assert_eq!(e["action"], "mounted", "{first}");
    }
    let events = first["run"]["events"].to_string();
    assert!(
        events.contains("group 2: warming") && !events.contains("warming 0"),
        "{events}"
    );
    assert!(entry(&first, "web01-dr")["note"].is_null(), "{first}");

    // `mounts --json` reads each mount's manifest (a fetch): listed before the count.
    let mounted = mounts(&server);
    assert_eq!(mounted.len(), 3, "{mounted:?}");
    // Quiet: the first apply's pre-staging and warm-ups have ended.
    let mut before = fetches(&server);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = fetches(&server);
        if now == before {
            break;
        }
        before = now;
    }

    let second = json(&server.cli(&["plan", "apply", p, "--json"]));
    assert_eq!(second["run"]["phase"], "done", "{second}");
    assert_eq!(second["id"], first["id"]);
    for e in second["entries"].as_array().unwrap() {
        assert_eq!(e["action"], "already_mounted", "{second}");
    }
    let events = second["run"]["events"].to_string();
    assert!(
        !events.contains("warming") && events.contains("3 mounted as the plan says already"),
        "{events}"
    );
    assert_eq!(fetches(&server), before, "the second apply fetched");

    // The same in words.
    let text = server.cli(&["plan", "apply", p]);
    assert!(
        text.contains("(already)") && text.contains("db01-dr"),
        "{text}"
    );
    assert_eq!(fetches(&server), before, "the third apply fetched");
    assert_eq!(mounts(&server), mounted, "a later apply changed mounts");
}

#[test]
fn groups_are_mounted_in_order_and_status_shows_every_entry() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_vms(t.path(), &["db01", "web01", "app01"]);
    let server = start(t.path(), &repo, &[]);
    // Listed out of order: the groups decide.
    let plan = plan_file(
        t.path(),
        "plan.toml",
        r#"
wait = "2s"
[[vm]]
vm = "app01"
name = "app01-dr"
group = 3
[[vm]]
vm = "web01"
name = "web01-dr"
group = 2
[[vm]]
vm = "db01"
name = "db01-dr"
group = 1
"#,
    );
    let p = plan.to_str().unwrap();
    let st = status(&server, &plan);
    assert!(st["run"].is_null(), "{st}");
    assert_eq!(st["entries"].as_array().unwrap().len(), 3);
    for e in st["entries"].as_array().unwrap() {
        assert_eq!(e["state"], "not_mounted", "{st}");
    }
    let text = server.cli(&["plan", "status", p]);
    for name in ["app01-dr", "web01-dr", "db01-dr"] {
        assert!(text.contains(name), "{text}");
    }
    assert_eq!(text.matches("not mounted").count(), 3, "{text}");

    let started = json(&server.cli(&["plan", "apply", p, "--no-wait", "--json"]));
    assert_eq!(started["run"]["phase"], "running", "{started}");
    // While group 1's VM has not booted (it never starts here), group 2 is not mounted.
    let st = wait_for(&server, &plan, "db01-dr mounted", |st| {
        entry(st, "db01-dr")["state"] == "mounted"
    });
    assert_eq!(entry(&st, "web01-dr")["state"], "not_mounted", "{st}");
    assert_eq!(entry(&st, "app01-dr")["state"], "not_mounted", "{st}");
    let st = wait_for(&server, &plan, "the run's end", run_ended);
    assert_eq!(st["run"]["phase"], "done", "{st}");

    let m = mounts(&server);
    let time = |n: &str| m[n].1.parse::<jiff::Timestamp>().unwrap();
    assert!(
        m["db01-dr"].0 < m["web01-dr"].0 && m["web01-dr"].0 < m["app01-dr"].0,
        "{m:?}"
    );
    // Each group waited the plan's 2 s for the one before.
    for (a, b) in [("db01-dr", "web01-dr"), ("web01-dr", "app01-dr")] {
        let gap = time(b).duration_since(time(a));
        assert!(
            gap >= jiff::SignedDuration::from_secs(2),
            "{a} -> {b}: {gap:?}"
        );
    }
    let events: Vec<&str> = st["run"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    let at = |what: &str| {
        events
            .iter()
            .position(|e| e.contains(what))
            .unwrap_or_else(|| panic!("{what:?} not in {events:?}"))
    };
    assert!(at("group 1: mounted db01") < at("group 1: not booted after 2 s"));
    assert!(at("group 1: not booted after 2 s") < at("group 2: mounted web01"));
    assert!(at("group 2: mounted web01") < at("group 3: mounted app01"));

    // db01's VM boots: its entry goes booting, then booted; every entry is shown.
    read_disk(&server, "db01-dr");
    let st = wait_for(&server, &plan, "db01-dr booted", |st| {
        entry(st, "db01-dr")["state"] == "booted"
    });
    assert_eq!(entry(&st, "web01-dr")["state"], "mounted", "{st}");
    assert_eq!(entry(&st, "app01-dr")["state"], "mounted", "{st}");
    let text = server.cli(&["plan", "status", p]);
    assert!(
        text.contains("applied") && text.contains("booted"),
        "{text}"
    );
}

#[test]
fn a_group_whose_vms_boot_lets_the_next_group_go_before_the_wait() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_vms(t.path(), &["db01", "web01"]);
    let server = start(t.path(), &repo, &[]);
    let plan = plan_file(
        t.path(),
        "plan.toml",
        "wait = \"60s\"\n[[vm]]\nvm = \"db01\"\nname = \"db01-dr\"\n[[vm]]\nvm = \"web01\"\nname = \"web01-dr\"\ngroup = 2\n",
    );
    server.cli(&["plan", "apply", plan.to_str().unwrap(), "--no-wait"]);
    wait_for(&server, &plan, "db01-dr mounted", |st| {
        entry(st, "db01-dr")["state"] == "mounted"
    });
    let t0 = Instant::now();
    read_disk(&server, "db01-dr");
    let st = wait_for(&server, &plan, "the run's end", run_ended);
    assert_eq!(st["run"]["phase"], "done", "{st}");
    // Booted (1 s quiet), well before the 60 s wait.
    assert!(t0.elapsed() < Duration::from_secs(30), "{st}");
    assert!(
        st["run"]["events"]
            .to_string()
            .contains("group 1: booted in"),
        "{st}"
    );
}

#[test]
fn a_mount_that_fails_mid_plan_stops_the_plan_and_keeps_the_groups_before() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_vms(t.path(), &["db01", "web01", "app01"]);
    let server = start(t.path(), &repo, &[]);
    let plan = plan_file(
        t.path(),
        "plan.toml",
        r#"
wait = "3s"
[[vm]]
vm = "db01"
name = "db01-dr"
[[vm]]
vm = "web01"
name = "web01-dr"
group = 2
[[vm]]
vm = "app01"
name = "app01-dr"
group = 3
"#,
    );
    let p = plan.to_str().unwrap();
    server.cli(&["plan", "apply", p, "--no-wait"]);
    wait_for(&server, &plan, "db01-dr mounted", |st| {
        entry(st, "db01-dr")["state"] == "mounted"
    });
    // While group 1 boots, someone takes group 2's name.
    server.cli(&["mount", "db01", "--name", "web01-dr"]);
    let st = wait_for(&server, &plan, "the run's end", run_ended);
    assert_eq!(st["run"]["phase"], "failed", "{st}");
    let error = st["run"]["error"].as_str().unwrap();
    for want in [
        "entry 2 (vm web01, name web01-dr) could not be mounted: a mount named web01-dr exists already",
        "the 1 later group(s) were not mounted",
        "stay mounted",
        "livemount unmount",
        "apply the plan again",
    ] {
        assert!(error.contains(want), "{want:?} not in {error}");
    }
    assert_eq!(entry(&st, "db01-dr")["state"], "mounted", "{st}");
    assert_eq!(entry(&st, "web01-dr")["state"], "conflict", "{st}");
    assert_eq!(entry(&st, "app01-dr")["state"], "not_mounted", "{st}");
    let before = mounts(&server);
    assert_eq!(before.keys().collect::<Vec<_>>(), ["db01-dr", "web01-dr"]);

    // Fixed, and applied again: group 1 is left as it is, the rest is mounted.
    server.cli(&["unmount", "web01-dr"]);
    let st = json(&server.cli(&["plan", "apply", p, "--json"]));
    assert_eq!(st["run"]["phase"], "done", "{st}");
    assert_eq!(entry(&st, "db01-dr")["action"], "already_mounted", "{st}");
    assert_eq!(entry(&st, "web01-dr")["action"], "mounted", "{st}");
    assert_eq!(entry(&st, "app01-dr")["action"], "mounted", "{st}");
    assert_eq!(mounts(&server)["db01-dr"], before["db01-dr"]);
}

#[test]
fn a_stop_ends_a_plan_between_groups_and_applying_it_again_after_the_restart_goes_on() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_vms(t.path(), &["db01", "web01"]);
    let server = start(t.path(), &repo, &[]);
    let plan = plan_file(
        t.path(),
        "plan.toml",
        "wait = \"600s\"\n[[vm]]\nvm = \"db01\"\nname = \"db01-dr\"\n[[vm]]\nvm = \"web01\"\nname = \"web01-dr\"\ngroup = 2\n",
    );
    let p = plan.to_str().unwrap();
    server.cli(&["plan", "apply", p, "--no-wait"]);
    wait_for(&server, &plan, "db01-dr mounted", |st| {
        entry(st, "db01-dr")["state"] == "mounted"
    });
    // The run waits up to 600 s for db01's boot: a stop does not wait for it.
    let t0 = Instant::now();
    assert!(server.stop().success());
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());

    let server = start(t.path(), &repo, &[]);
    let st = status(&server, &plan);
    assert!(st["run"].is_null(), "{st}");
    assert_eq!(entry(&st, "db01-dr")["state"], "mounted", "{st}");
    assert_eq!(entry(&st, "web01-dr")["state"], "not_mounted", "{st}");
    // A mount brought back at the start records no boot: group 1 counts as booted, and
    // group 2 is mounted at once.
    let t0 = Instant::now();
    let st = json(&server.cli(&["plan", "apply", p, "--json"]));
    assert_eq!(st["run"]["phase"], "done", "{st}");
    assert_eq!(entry(&st, "db01-dr")["action"], "already_mounted", "{st}");
    assert_eq!(entry(&st, "web01-dr")["action"], "mounted", "{st}");
    assert!(t0.elapsed() < Duration::from_secs(30), "{st}");
}
