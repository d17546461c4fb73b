//! `livemount backups [--vm NAME] [--json]`

use std::process::ExitCode;

use clap::Args;

use super::{human, RepoArgs};

#[derive(Debug, Args)]
pub struct BackupsArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Only snapshots of this VM.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Print the list as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: BackupsArgs) -> anyhow::Result<ExitCode> {
    let repo = a.repo.open().await?;
    let (mut all, bad) = repo.list_snapshots().await?;
    if let Some(vm) = &a.vm {
        all.retain(|s| &s.vm.name == vm);
    }
    for (id, e) in &bad {
        eprintln!("warning: snapshot {id} cannot be read: {e}");
    }
    if a.json {
        super::print_json(&all)?;
        return Ok(ExitCode::SUCCESS);
    }
    if all.is_empty() {
        println!("no snapshots");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<12}  {:<40}  {:<6}  {:>5}  {:>10}  {:>10}",
        "ID", "SNAPSHOT", "KIND", "DISKS", "SIZE", "DATA"
    );
    for s in &all {
        println!(
            "{:<12}  {:<40}  {:<6}  {:>5}  {:>10}  {:>10}",
            s.id.short(),
            s.name,
            s.vm.hypervisor,
            s.disks.len(),
            human(s.size),
            human(s.allocated)
        );
    }
    Ok(ExitCode::SUCCESS)
}
