//! `livemount forget [VM...] --keep-* N [--dry-run] [--json]`,
//! `livemount forget --policy [VM...]`, `livemount forget SNAPSHOT...`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::RepoArgs;
use crate::repo::retention::Policy;
use crate::repo::{ForgetPlan, ForgetTarget};

#[derive(Debug, Args)]
pub struct ForgetArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// With a policy: the VMs it applies to (all when left out). Without: the snapshots to
    /// forget (VM@TIME or an id prefix).
    #[arg(value_name = "VM|SNAPSHOT")]
    names: Vec<String>,
    /// Keep the N newest snapshots (0, alone: forget every snapshot of the VMs).
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last N hours that have one (UTC).
    #[arg(long, value_name = "N")]
    keep_hourly: Option<u32>,
    /// The same per day (UTC).
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// The same per ISO week (Monday to Sunday, UTC).
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    /// The same per month (UTC).
    #[arg(long, value_name = "N")]
    keep_monthly: Option<u32>,
    /// The same per year (UTC).
    #[arg(long, value_name = "N")]
    keep_yearly: Option<u32>,
    /// Apply the [retention] policy of --repo-config.
    #[arg(long, conflicts_with_all = ["keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"])]
    policy: bool,
    /// Say what would be kept and forgotten; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the plan (and what was done) as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Outcome<'a> {
    dry_run: bool,
    #[serde(flatten)]
    plan: &'a ForgetPlan,
    /// Snapshots forgotten (empty with --dry-run).
    forgotten: Vec<String>,
}

pub async fn run(a: ForgetArgs) -> anyhow::Result<ExitCode> {
    let from_flags = Policy {
        keep_last: a.keep_last,
        keep_hourly: a.keep_hourly,
        keep_daily: a.keep_daily,
        keep_weekly: a.keep_weekly,
        keep_monthly: a.keep_monthly,
        keep_yearly: a.keep_yearly,
    };
    let target = if a.policy {
        let path = a.repo.repo_config.as_ref().context(
            "--policy applies the [retention] section of the config file: give it with --repo-config FILE",
        )?;
        let file = super::RepoFile::read(path)?;
        let policy = file
            .retention
            .map(|r| r.policy())
            .filter(|p| !p.is_empty())
            .with_context(|| {
                format!(
                    "{}: no retention rule in its [retention] section (keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly)",
                    path.display()
                )
            })?;
        ForgetTarget::Policy {
            policy,
            vms: a.names.clone(),
        }
    } else if !from_flags.is_empty() {
        ForgetTarget::Policy {
            policy: from_flags,
            vms: a.names.clone(),
        }
    } else {
        ForgetTarget::Named(a.names.clone())
    };
    let repo = a.repo.open().await?;
    let plan = repo.plan_forget(&target).await?;
    let mut forgotten = Vec::new();
    if !a.dry_run {
        for v in &plan.remove {
            repo.forget_snapshot(&v.id)
                .await
                .with_context(|| format!("forgetting {}", v.name))?;
            forgotten.push(v.name.clone());
        }
    }
    if a.json {
        super::print_json(&Outcome {
            dry_run: a.dry_run,
            plan: &plan,
            forgotten,
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    for v in &plan.keep {
        println!("keep    {}  {}", v.name, v.reasons.join(", "));
    }
    let verb = if a.dry_run { "would forget" } else { "forget " };
    for v in &plan.remove {
        println!("{verb} {}  ({})", v.name, v.id.short());
    }
    println!(
        "{} kept, {} {}{}",
        plan.keep.len(),
        plan.remove.len(),
        if a.dry_run {
            "would be forgotten (dry run: nothing changed)"
        } else {
            "forgotten"
        },
        if !a.dry_run && !plan.remove.is_empty() {
            "; their chunks go at the next `livemount prune`"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}
