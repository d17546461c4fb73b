//! `livemount restore SNAPSHOT [--at TIME] --to DIR [--json]`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::progress::Bar;
use super::{human, RepoArgs, SnapshotArgs};

#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    snapshot: SnapshotArgs,
    /// Folder to restore into (created if missing; existing files are never overwritten).
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: RestoreArgs) -> anyhow::Result<ExitCode> {
    let repo = a.repo.open().await?;
    let info = a.snapshot.resolve(&repo).await?;
    let bar = Bar::new(&format!("restore {}", info.name), true, a.json);
    let summary = repo.restore(&info.id, &a.to, &bar).await;
    bar.finish();
    let s = summary?;
    if a.json {
        super::print_json(&s)?;
    } else {
        println!("restored {} into {}", s.name, a.to.display());
        println!("  config  {}", s.config.display());
        for d in &s.disks {
            println!(
                "  disk    {} ({}) <- {}",
                d.path.display(),
                human(d.size),
                d.name
            );
            if let Some(desc) = &d.descriptor {
                println!("          {} (descriptor)", desc.display());
            }
        }
        println!(
            "  {} written, {:.1} s, {:.0} MB/s",
            human(s.written_bytes),
            s.seconds,
            s.mb_per_s
        );
        println!(
            "  the config is the original: its disk paths may need pointing at the files above"
        );
    }
    Ok(ExitCode::SUCCESS)
}
