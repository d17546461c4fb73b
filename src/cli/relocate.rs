//! `livemount relocate MOUNT --to DIR [--rate MB/s] [--wait]`, `relocate --finish MOUNT`,
//! `relocate --cancel MOUNT`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::human;
use super::mount::StateArgs;
use super::progress::Bar;
use crate::agent::RelocateRequest;
use crate::control::Client;
use crate::relocate::{Phase, RelocationStatus};
use crate::repo::Progress;

#[derive(Debug, Args)]
pub struct RelocateArgs {
    #[command(flatten)]
    state: StateArgs,
    /// The mount whose VM moves to primary storage.
    #[arg(value_name = "MOUNT")]
    mount: String,
    /// Copy the mount's disks (as its VM sees them) into this folder on primary storage: new,
    /// or empty.
    #[arg(long, value_name = "DIR", required_unless_present_any = ["finish", "cancel"], conflicts_with_all = ["finish", "cancel"])]
    to: Option<PathBuf>,
    /// Copy at most this many MB (10^6 bytes) per second [default: as fast as the VM's own
    /// reads allow].
    #[arg(long, value_name = "MB/s")]
    rate: Option<f64>,
    /// Wait until the copy is complete (it then follows the VM's writes), with progress.
    #[arg(long, conflicts_with_all = ["finish", "cancel"])]
    wait: bool,
    /// Hand over to the copy; the VM must be stopped. Copies what is left, verifies the copy
    /// against the mount block by block, writes the VM's config next to it, retires the mount
    /// and prints how to start the VM from its new home.
    #[arg(long, conflicts_with = "cancel")]
    finish: bool,
    /// With --finish: skip the check that the VM stopped writing (its further writes are
    /// refused).
    #[arg(long, requires = "finish")]
    force: bool,
    /// Stop the relocation and remove the partial copy; the mount runs on as it was.
    #[arg(long)]
    cancel: bool,
    /// Benchmarks only: copy with the VM's priority, ignoring its reads.
    #[arg(long, hide = true)]
    no_priority: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: RelocateArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_state(&a.state.state)?;
    let path = format!("/v1/mounts/{}/relocation", a.mount);
    if a.cancel {
        let _: RelocationStatus = client.clone().request("DELETE", path, None).await?;
        // Done when the record is gone; a cleanup that failed keeps it, with its error.
        let last = poll(&client, &a.mount, None, |s| {
            s.is_none_or(|s| s.phase == Phase::Failed || s.error.is_some())
        })
        .await?;
        if let Some(s) = last {
            return failed(&s, a.json);
        }
        if a.json {
            super::print_json(&serde_json::json!({"mount": a.mount, "cancelled": true}))?;
        } else {
            println!(
                "relocation of {} cancelled: the partial copy is removed, the mount runs on as before",
                a.mount
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if a.finish {
        let _: RelocationStatus = client
            .clone()
            .request("POST", format!("{path}/finish?force={}", a.force), None)
            .await?;
        let bar = Some(Bar::new("verifying", true, a.json));
        let last = poll(&client, &a.mount, bar, |s| {
            s.is_none_or(|s| s.phase != Phase::Finishing)
        })
        .await?;
        let Some(s) = last else {
            anyhow::bail!("the relocation of {} went away during its handover; `livemount mounts` shows whether the mount is still there", a.mount);
        };
        match s.phase {
            Phase::Done => {}
            Phase::Cancelling => anyhow::bail!(
                "the relocation of {} was cancelled during its handover; the mount runs on as before",
                a.mount
            ),
            _ => return failed(&s, a.json),
        }
        if a.json {
            super::print_json(&s)?;
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "{} is handed over: {} verified in {}; the mount is retired",
            a.mount,
            human(s.verified),
            s.dest.display()
        );
        if let Some(c) = &s.config {
            println!("config: {}", c.display());
        }
        println!("start the VM from its new home:");
        for line in &s.start {
            println!("  {line}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(to) = a.to else {
        anyhow::bail!("--to DIR is needed to start a relocation");
    };
    let to = std::path::absolute(&to).map_err(|e| anyhow::anyhow!("--to {}: {e}", to.display()))?;
    let rate = match a.rate {
        None => None,
        Some(r) if r.is_finite() && r > 0.0 => Some((r * 1e6) as u64),
        Some(r) => anyhow::bail!("--rate {r}: give MB per second above zero, e.g. 100"),
    };
    let req = RelocateRequest {
        to,
        rate,
        unprioritized: a.no_priority,
    };
    let mut s: RelocationStatus = client
        .clone()
        .request("POST", path, Some(serde_json::to_value(&req)?))
        .await?;
    if a.wait {
        let bar = Some(Bar::new("copying", true, a.json));
        let last = poll(&client, &a.mount, bar, |s| {
            s.is_none_or(|s| s.phase != Phase::Copying)
        })
        .await?;
        match last {
            Some(l) if l.phase == Phase::Failed => return failed(&l, a.json),
            Some(l) => s = l,
            None => anyhow::bail!("the relocation of {} went away while it copied", a.mount),
        }
    }
    if a.json {
        super::print_json(&s)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "relocating {} to {}: {} of {} copied{}",
        s.mount,
        s.dest.display(),
        human(s.copied),
        human(s.total),
        match s.phase {
            Phase::Synced => "; in sync, following the VM's writes".to_string(),
            _ => format!(
                "; `livemount mounts` shows progress{}",
                s.rate_limit
                    .map(|r| format!(", at most {:.0} MB/s", r as f64 / 1e6))
                    .unwrap_or_default()
            ),
        }
    );
    println!(
        "when the VM is stopped: livemount relocate --finish {}",
        s.mount
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints a failed relocation's error; exit code 1.
fn failed(s: &RelocationStatus, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        super::print_json(s)?;
    } else {
        eprintln!(
            "error: relocation of {} failed: {}",
            s.mount,
            s.error.as_deref().unwrap_or("no reason recorded")
        );
        eprintln!(
            "the mount runs on as before; `livemount relocate {} --to {}` retries, --cancel removes the copy",
            s.mount,
            s.dest.display()
        );
    }
    Ok(ExitCode::from(1))
}

/// Polls the mount's relocation until `done` says so, with a bar of bytes copied (while
/// copying) or verified (at the handover). Returns the last status (`None`: it is gone).
async fn poll(
    client: &Client,
    mount: &str,
    bar: Option<Bar>,
    done: impl Fn(Option<&RelocationStatus>) -> bool,
) -> anyhow::Result<Option<RelocationStatus>> {
    loop {
        let all: Vec<RelocationStatus> = client
            .clone()
            .request("GET", "/v1/relocations".into(), None)
            .await?;
        let s = all.into_iter().find(|s| s.mount == mount);
        if let (Some(b), Some(s)) = (&bar, &s) {
            b.set_total(s.total);
            b.set_position(match s.phase {
                Phase::Finishing | Phase::Done => s.verified,
                _ => s.copied,
            });
        }
        if done(s.as_ref()) {
            if let Some(b) = &bar {
                b.finish();
            }
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
