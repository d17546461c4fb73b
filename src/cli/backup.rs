//! `livemount backup --repo DIR --config VMCONFIG [--disk PATH ...] [--parent S --changed-blocks F]`

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::progress::Bar;
use super::{human, RepoArgs};
use crate::repo::{BackupOptions, ChangedBlocks};

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The VM's config: a VMware .vmx or a libvirt domain XML.
    #[arg(long, value_name = "VMCONFIG")]
    config: PathBuf,
    /// Where to read each disk, in the config's order (default: the paths in the config,
    /// relative to its folder).
    #[arg(long = "disk", value_name = "PATH")]
    disks: Vec<PathBuf>,
    /// Incremental: take blocks outside the changed extents from this snapshot.
    #[arg(long, value_name = "SNAPSHOT", requires = "changed_blocks")]
    parent: Option<String>,
    /// JSON list of changed byte extents per disk since --parent (VMware CBT's shape).
    #[arg(long, value_name = "FILE", requires = "parent")]
    changed_blocks: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: BackupArgs) -> anyhow::Result<ExitCode> {
    let repo = a.repo.open().await?;
    let mut opts = BackupOptions::from_config_file(&a.config, &a.disks)?;
    if let (Some(parent), Some(file)) = (&a.parent, &a.changed_blocks) {
        let parent = repo
            .resolve(&super::spec(parent, None)?)
            .await
            .context("--parent")?;
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        opts.parent = Some(parent.id);
        opts.changed = Some(ChangedBlocks::from_json(file, &bytes)?);
    }
    let bar = Bar::new(&format!("backup {}", opts.config.name), true, a.json);
    let summary = repo.backup(&opts, &bar).await;
    bar.finish();
    let s = summary?;
    if a.json {
        super::print_json(&s)?;
    } else {
        println!("snapshot {} ({})", s.name, s.snapshot.short());
        println!(
            "  disks {}: read {}, zero {}, from parent {}",
            human(s.logical_bytes),
            human(s.read_bytes),
            human(s.zero_bytes),
            human(s.reused_bytes)
        );
        println!(
            "  new data {} ({} new chunks with metadata), stored {} after compression; dedup ratio {}",
            human(s.new_bytes),
            s.new_chunks,
            human(s.stored_bytes),
            s.dedup_ratio
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "n/a (no new data)".into())
        );
        println!("  {:.1} s, {:.0} MB/s", s.seconds, s.mb_per_s);
    }
    Ok(ExitCode::SUCCESS)
}
