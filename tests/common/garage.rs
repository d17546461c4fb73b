//! A real Garage object store for tests, started by the project's `scripts/garage` on free
//! loopback ports and stopped (by PID) when dropped. Garage is a required prerequisite
//! (scripts/install-deps installs it): a missing one fails the test, it never skips.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/garage")
}

/// A running Garage cluster (1 or 3 nodes) with one bucket and one key.
pub struct Garage {
    pub dir: PathBuf,
    pub bucket: String,
    /// The AWS_* variables a client needs (endpoint, region, keys, plain HTTP).
    pub env: Vec<(String, String)>,
    pub base_port: u16,
    _tmp: tempfile::TempDir,
}

/// The next block of 30 ports to try; each test binary starts at a place of its own.
static NEXT_BASE: AtomicU16 = AtomicU16::new(0);

fn free_base() -> u16 {
    let _ = NEXT_BASE.compare_exchange(
        0,
        20000 + (std::process::id() % 300) as u16 * 100,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let base = NEXT_BASE.fetch_add(30, Ordering::SeqCst);
        assert!(base < 60000, "no free block of loopback ports for Garage");
        let all_free = (0..30).all(|o| TcpListener::bind(("127.0.0.1", base + o)).is_ok());
        if all_free {
            return base;
        }
    }
}

impl Garage {
    /// Starts `nodes` (1 or 3) nodes and waits until the cluster is healthy.
    pub fn up(nodes: u32) -> Garage {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("garage");
        let base = free_base();
        let out = Command::new(script())
            .args([
                "up",
                dir.to_str().unwrap(),
                &nodes.to_string(),
                &base.to_string(),
            ])
            .output()
            .expect("running scripts/garage");
        if !out.status.success() {
            let _ = Command::new(script())
                .args(["down", dir.to_str().unwrap()])
                .status();
            panic!(
                "scripts/garage up failed (garage is required for this test; scripts/install-deps installs it): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = std::fs::read_to_string(dir.join("env")).unwrap();
        let mut env = Vec::new();
        let mut bucket = String::new();
        for line in text.lines() {
            let Some((k, v)) = line.trim_start_matches("export ").split_once('=') else {
                continue;
            };
            if k == "GARAGE_BUCKET" {
                bucket = v.to_string();
            } else {
                env.push((k.to_string(), v.to_string()));
            }
        }
        Garage {
            dir,
            bucket,
            env,
            base_port: base,
            _tmp: tmp,
        }
    }

    /// `s3://BUCKET/PREFIX`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    pub fn var(&self, name: &str) -> String {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {name} in the Garage env"))
    }

    /// SIGKILLs node `i` (1-based).
    pub fn kill_node(&self, i: u32) {
        self.run(&["kill-node", self.dir.to_str().unwrap(), &i.to_string()]);
    }

    /// Starts node `i` again.
    pub fn start_node(&self, i: u32) {
        self.run(&["start-node", self.dir.to_str().unwrap(), &i.to_string()]);
    }

    fn run(&self, args: &[&str]) {
        let out = Command::new(script()).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "scripts/garage {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// An `object_store` client of the bucket, for tests that look at or damage objects.
    pub fn client(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(self.var("AWS_ENDPOINT_URL"))
            .with_region(self.var("AWS_REGION"))
            .with_access_key_id(self.var("AWS_ACCESS_KEY_ID"))
            .with_secret_access_key(self.var("AWS_SECRET_ACCESS_KEY"))
            .with_allow_http(true)
            .with_bucket_name(&self.bucket)
            .build()
            .unwrap()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["down", self.dir.to_str().unwrap()])
            .status();
    }
}
