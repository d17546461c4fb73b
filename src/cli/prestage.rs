//! `livemount prestage SNAPSHOT [--at TIME] [--no-wait] [--json]`: warm a VM's boot set from its
//! boot profile into the running server's disk cache, ahead of any mount.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::mount::{describe_prestage, StateArgs};
use super::progress::Bar;
use crate::agent::{WarmInfo, WarmRequest};
use crate::control::Client;
use crate::repo::Progress;

#[derive(Debug, Args)]
pub struct PrestageArgs {
    /// VM@TIME, a unique id prefix, or a VM name (its latest snapshot).
    #[arg(value_name = "SNAPSHOT")]
    snapshot: String,
    /// With a VM name: its latest snapshot at or before this RFC 3339 time.
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
    /// Return once the warm-up has started instead of waiting for it.
    #[arg(long)]
    no_wait: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    state: StateArgs,
}

pub async fn run(a: PrestageArgs) -> anyhow::Result<ExitCode> {
    let at = a.at.as_deref().map(crate::repo::parse_time).transpose()?;
    let client = Client::from_state(&a.state.state)?;
    let req = WarmRequest {
        snapshot: a.snapshot.clone(),
        at,
    };
    let mut info: WarmInfo = client
        .clone()
        .request(
            "POST",
            "/v1/prestage".into(),
            Some(serde_json::to_value(&req)?),
        )
        .await?;
    if !a.no_wait {
        let bar = Bar::new(&format!("prestage {}", info.name), false, a.json);
        bar.set_total(info.status.chunks);
        while !info.status.finished {
            tokio::time::sleep(Duration::from_millis(100)).await;
            info = client
                .clone()
                .request("GET", format!("/v1/prestage/{}", info.id), None)
                .await?;
            bar.set_position(info.status.done());
        }
        bar.finish();
    }
    if a.json {
        super::print_json(&info)?;
    } else {
        println!(
            "{}: {} into the disk cache",
            info.name,
            describe_prestage(&info.status)
        );
    }
    // Chunks that could not be fetched are the operator's to know about.
    Ok(if info.status.failed > 0 {
        eprintln!(
            "warning: {} chunk(s) could not be fetched (the server's log names them)",
            info.status.failed
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
