//! `livemount prune [--dry-run] [--json]`: deletes the chunks no snapshot needs.

use std::process::ExitCode;

use clap::Args;

use super::progress::Bar;
use super::{human, RepoArgs};

#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Say what would be deleted; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: PruneArgs) -> anyhow::Result<ExitCode> {
    let repo = a.repo.open().await?;
    let bar = Bar::new("prune", true, a.json);
    let report = repo.prune(a.dry_run, repo.lease_expiry(), &bar).await;
    bar.finish();
    let r = report?;
    if a.json {
        super::print_json(&r)?;
        return Ok(ExitCode::SUCCESS);
    }
    let dry = if r.dry_run {
        " (dry run: nothing changed)"
    } else {
        ""
    };
    println!(
        "before  {} chunks, {} stored, for {} snapshot(s)",
        r.before.chunks,
        human(r.before.bytes),
        r.snapshots
    );
    println!(
        "{} {} chunks, {}{dry}",
        if r.dry_run { "would delete" } else { "deleted" },
        r.deleted.chunks,
        human(r.deleted.bytes)
    );
    if r.put_back > 0 {
        println!(
            "put back {} chunks set aside earlier that a new snapshot needs",
            r.put_back
        );
    }
    println!(
        "after   {} chunks, {} stored",
        r.after.chunks,
        human(r.after.bytes)
    );
    if r.waiting.chunks > 0 {
        println!(
            "set aside {} chunks ({}) until these backups finish; the next prune after them deletes what no snapshot needs:",
            r.waiting.chunks,
            human(r.waiting.bytes)
        );
        for w in &r.waiting_for {
            println!("    {w}");
        }
    }
    if !r.expired_leases.is_empty() {
        println!(
            "removed {} expired lease(s): {}",
            r.expired_leases.len(),
            r.expired_leases.join(", ")
        );
    }
    if r.forgotten_dropped > 0 {
        println!(
            "dropped {} forgotten manifest(s) no lease needs any more",
            r.forgotten_dropped
        );
    }
    Ok(ExitCode::SUCCESS)
}
