//! `livemount unmount NAME`

use std::process::ExitCode;

use clap::Args;

use super::mount::StateArgs;
use crate::control::Client;
use crate::mount::MountSpec;

#[derive(Debug, Args)]
pub struct UnmountArgs {
    #[command(flatten)]
    state: StateArgs,
    /// The mount's name (`livemount mounts` lists them).
    name: String,
    /// Keep the VM's writes in the state directory: mounting the same snapshot under the same
    /// name again picks them up. Without it they are discarded.
    #[arg(long)]
    keep_writes: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: UnmountArgs) -> anyhow::Result<ExitCode> {
    let spec: MountSpec = Client::from_state(&a.state.state)?
        .request(
            "DELETE",
            format!("/v1/mounts/{}?keep_writes={}", a.name, a.keep_writes),
            None,
        )
        .await?;
    if a.json {
        super::print_json(&spec)?;
    } else {
        let writes = if a.keep_writes {
            "its writes are kept: mount the same snapshot under this name to pick them up"
        } else {
            "its writes are discarded"
        };
        println!(
            "unmounted {} ({}); {writes}; the backup is unchanged",
            spec.name, spec.snapshot_name
        );
    }
    Ok(ExitCode::SUCCESS)
}
