//! `livemount plan apply PLAN.toml [--json] [--no-wait]` and `livemount plan status PLAN.toml
//! [--json]`: recovery plans (decision 0032). The file is read here; the server checks it
//! whole, applies it and says where each entry stands.
//!
//! `apply` follows the run until it ends: a line per event (mounted, warming, booted) on
//! stdout, a bar of entries settled on stderr (a terminal's only), then the table of entries;
//! `--json` prints one JSON document at the end, the plan's final status (with `--no-wait`,
//! its status at the start). Exit status 1 when the run failed or was stopped.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::mount::StateArgs;
use super::progress::Bar;
use crate::agent::{Action, EntryState, Plan, PlanStatus, RunPhase};
use crate::control::Client;
use crate::repo::Progress;

/// How often `apply` asks how the run goes.
const POLL: Duration = Duration::from_millis(250);

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Mount the plan's VMs group by group (group 1 first), warming each next group's boot
    /// sets while the group before boots; entries mounted as the plan says already are left
    /// as they are. A bad plan is refused whole: nothing is mounted.
    Apply(ApplyArgs),
    /// Where each entry of the plan stands: not mounted, pre-staging, mounted, booting,
    /// booted, failed, or conflict (its name holds another snapshot).
    Status(PlanStatusArgs),
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The plan: a TOML file of [[vm]] entries (examples/recovery-plan.toml).
    #[arg(value_name = "PLAN.toml")]
    plan: PathBuf,
    /// Print one JSON document, the plan's status, at the end.
    #[arg(long)]
    json: bool,
    /// Return once the plan is checked and its run started; `plan status` follows it.
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(Debug, Args)]
pub struct PlanStatusArgs {
    #[arg(value_name = "PLAN.toml")]
    plan: PathBuf,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    state: StateArgs,
}

pub async fn run(c: PlanCommand) -> anyhow::Result<ExitCode> {
    match c {
        PlanCommand::Apply(a) => apply(a).await,
        PlanCommand::Status(a) => status(a).await,
    }
}

fn read_plan(path: &Path) -> anyhow::Result<Plan> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the plan {}", path.display()))?;
    Plan::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: bad plan:\n{e}", path.display()))
}

async fn apply(a: ApplyArgs) -> anyhow::Result<ExitCode> {
    let plan = read_plan(&a.plan)?;
    let client = Client::from_state(&a.state.state)?;
    let mut st: PlanStatus = client
        .clone()
        .request(
            "POST",
            "/v1/plans".into(),
            Some(serde_json::to_value(&plan)?),
        )
        .await?;
    if !a.no_wait {
        let bar = Bar::new("plan", false, a.json);
        bar.set_total(st.entries.len() as u64);
        let (mut seen, mut first) = (0, true);
        loop {
            let run = st.run.as_ref();
            let events = run.map(|r| r.events.as_slice()).unwrap_or_default();
            if !a.json {
                for e in events.iter().skip(seen) {
                    bar.line(e);
                }
            }
            seen = seen.max(events.len());
            bar.set_position(
                st.entries
                    .iter()
                    .filter(|e| settled(e.action, e.state))
                    .count() as u64,
            );
            if run.is_none_or(|r| r.phase != RunPhase::Running) {
                break;
            }
            // At once the first time: a plan applied again has ended already.
            if !first {
                tokio::time::sleep(POLL).await;
            }
            first = false;
            st = client
                .clone()
                .request("GET", format!("/v1/plans/{}", st.id), None)
                .await?;
        }
        bar.finish();
    }
    if a.json {
        super::print_json(&st)?;
    } else {
        print_table(&st);
    }
    let failed = st
        .run
        .as_ref()
        .is_some_and(|r| matches!(r.phase, RunPhase::Failed | RunPhase::Stopped));
    if let Some(e) = st.run.as_ref().and_then(|r| r.error.as_ref()) {
        eprintln!("error: {e}");
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// An entry the run is done with.
fn settled(action: Option<Action>, state: EntryState) -> bool {
    action.is_some() || state == EntryState::Failed
}

async fn status(a: PlanStatusArgs) -> anyhow::Result<ExitCode> {
    let plan = read_plan(&a.plan)?;
    let client = Client::from_state(&a.state.state)?;
    let st: PlanStatus = client
        .request(
            "POST",
            "/v1/plans/status".into(),
            Some(serde_json::to_value(&plan)?),
        )
        .await?;
    if a.json {
        super::print_json(&st)?;
    } else {
        print_table(&st);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(st: &PlanStatus) {
    match &st.run {
        Some(r) => println!(
            "plan {}: {}{}",
            st.id,
            match r.phase {
                RunPhase::Running => "being applied",
                RunPhase::Done => "applied",
                RunPhase::Failed => "stopped: a mount failed",
                RunPhase::Stopped => "stopped: the server stopped",
            },
            match (r.phase, r.group) {
                (RunPhase::Running, Some(g)) => format!(" (group {g} of {:?})", r.groups),
                _ => String::new(),
            }
        ),
        None => println!(
            "plan {}: not applied on this server since it started",
            st.id
        ),
    }
    println!(
        "{:>3}  {:>5}  {:<24}  {:<16}  {:<18}  snapshot",
        "#", "group", "name", "vm", "state"
    );
    for e in &st.entries {
        let state = match (e.state, &e.prestage) {
            (EntryState::Prestaging, Some(p)) if p.chunks > 0 => {
                format!("pre-staging {}%", p.done() * 100 / p.chunks)
            }
            (s, _) => s.as_str().to_owned(),
        };
        let state = match e.action {
            Some(Action::AlreadyMounted) => format!("{state} (already)"),
            _ => state,
        };
        println!(
            "{:>3}  {:>5}  {:<24}  {:<16}  {:<18}  {}",
            e.index,
            e.group,
            e.name,
            e.vm,
            state,
            e.snapshot.as_deref().unwrap_or("-")
        );
        for extra in [&e.error, &e.note].into_iter().flatten() {
            println!("       {extra}");
        }
    }
}
