//! `livemount verify [SNAPSHOT] [--at TIME] [--json]`: exits 1 when anything is bad.

use std::process::ExitCode;

use clap::Args;

use super::progress::Bar;
use super::{human, RepoArgs};
use crate::repo::ChunkProblem;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The snapshot to verify (VM@TIME, id prefix or VM name); all snapshots when left out.
    #[arg(value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// With a VM name: its latest snapshot at or before this time.
    #[arg(long, value_name = "TIME", requires = "snapshot")]
    at: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let repo = a.repo.open().await?;
    let only = match &a.snapshot {
        Some(s) => Some(repo.resolve(&super::spec(s, a.at.as_deref())?).await?.id),
        None => None,
    };
    let bar = Bar::new("verify", false, a.json);
    let report = repo.verify(only, &bar).await;
    bar.finish();
    let r = report?;
    if a.json {
        super::print_json(&r)?;
    } else {
        for b in &r.bad_chunks {
            let what = match &b.problem {
                ChunkProblem::Missing => "missing".to_string(),
                ChunkProblem::Corrupt(w) => format!("corrupt ({w})"),
                ChunkProblem::Unreadable(w) => format!("unreadable ({w})"),
            };
            println!("BAD chunk {} {what}", b.chunk);
            for u in &b.used_by {
                println!("    used by {u}");
            }
        }
        for (s, e) in &r.bad_snapshots {
            println!("BAD snapshot {s}: {e}");
        }
        println!(
            "{} snapshot(s), {} chunks, {} checked in {:.1} s: {}",
            r.snapshots.len(),
            r.chunks_checked,
            human(r.bytes_checked),
            r.seconds,
            if r.is_clean() {
                "all good".to_string()
            } else {
                format!(
                    "{} bad chunk(s), {} unreadable snapshot(s)",
                    r.bad_chunks.len(),
                    r.bad_snapshots.len()
                )
            }
        );
    }
    Ok(if r.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
