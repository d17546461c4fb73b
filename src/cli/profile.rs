//! `livemount profile list | show VM | export VM FILE | import FILE | forget VM`: the boot
//! profiles in a state directory. These read and write the files directly (no server needed);
//! a running server picks changes up at the next mount.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::human;
use super::mount::StateArgs;
use crate::profile::{self, Profile, ProfileError, ProfileStore};

#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// List the boot profiles.
    List(ListArgs),
    /// Show one VM's profile: its boot set in first-read order.
    Show(VmArgs),
    /// Copy a VM's profile to FILE (to carry it to another media agent).
    Export(ExportArgs),
    /// Add a profile file (checked first); replaces the VM's profile if it has one.
    Import(ImportArgs),
    /// Remove a VM's profile; its next boot learns a new one.
    Forget(VmArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    state: StateArgs,
    /// Print the list as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct VmArgs {
    #[command(flatten)]
    state: StateArgs,
    /// The VM's name, as `livemount backups` shows it.
    vm: String,
    /// Print as JSON (the profile file itself, for `show`).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    state: StateArgs,
    vm: String,
    /// Where to write it (must not exist).
    file: PathBuf,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    state: StateArgs,
    file: PathBuf,
}

/// One line per profile, for `list --json`.
#[derive(Debug, serde::Serialize)]
struct Summary<'a> {
    vm: &'a str,
    boots: u32,
    blocks: usize,
    bytes: u64,
    updated: jiff::Timestamp,
}

pub fn run(cmd: ProfileCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ProfileCommand::List(a) => {
            let (profiles, bad) = ProfileStore::new(&a.state.state).list();
            for e in &bad {
                eprintln!("warning: {e}");
            }
            let rows: Vec<Summary> = profiles
                .iter()
                .map(|p| Summary {
                    vm: &p.vm,
                    boots: p.boots,
                    blocks: p.blocks.len(),
                    bytes: p.blocks.len() as u64 * p.chunk_size,
                    updated: p.updated,
                })
                .collect();
            if a.json {
                super::print_json(&rows)?;
            } else if rows.is_empty() {
                println!("no boot profiles (a VM's first boot from a live mount makes one)");
            } else {
                println!(
                    "{:<32}  {:>5}  {:>7}  {:>10}  UPDATED",
                    "VM", "BOOTS", "BLOCKS", "BOOT SET"
                );
                for r in &rows {
                    println!(
                        "{:<32}  {:>5}  {:>7}  {:>10}  {}",
                        r.vm,
                        r.boots,
                        r.blocks,
                        human(r.bytes),
                        r.updated.strftime("%Y-%m-%d %H:%M:%S")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ProfileCommand::Show(a) => {
            let p = load(&a.state, &a.vm)?;
            if a.json {
                super::print_json(&p)?;
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "VM {}: {} boots merged, {} blocks ({}), updated {}",
                p.vm,
                p.boots,
                p.blocks.len(),
                human(p.blocks.len() as u64 * p.chunk_size),
                p.updated
            );
            println!(
                "{:>9}  {:>6}  {:<24}  {:>10}  CHUNK",
                "FIRST MS", "SCORE", "DISK", "BLOCK"
            );
            for b in &p.blocks {
                println!(
                    "{:>9}  {:>6.3}  {:<24}  {:>10}  {}",
                    b.first_ms,
                    b.score,
                    b.disk,
                    b.block,
                    &b.chunk.to_hex()[..16]
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ProfileCommand::Export(a) => {
            let p = load(&a.state, &a.vm)?;
            let mut text = serde_json::to_vec_pretty(&p)?;
            text.push(b'\n');
            crate::durable::create_new(&a.file, &text).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    anyhow::anyhow!("{}: {e} (export never overwrites a file)", a.file.display())
                } else {
                    anyhow::anyhow!("{}: {e}", a.file.display())
                }
            })?;
            println!("exported the profile of {} to {}", p.vm, a.file.display());
            Ok(ExitCode::SUCCESS)
        }
        ProfileCommand::Import(a) => {
            let bytes =
                std::fs::read(&a.file).map_err(|e| anyhow::anyhow!("{}: {e}", a.file.display()))?;
            let p = profile::parse(&a.file, &bytes)?;
            let path = ProfileStore::new(&a.state.state).save(&p)?;
            println!(
                "imported the profile of {} ({} blocks) as {}",
                p.vm,
                p.blocks.len(),
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        ProfileCommand::Forget(a) => {
            ProfileStore::new(&a.state.state).forget(&a.vm)?;
            println!("forgot the boot profile of {}", a.vm);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load(state: &StateArgs, vm: &str) -> Result<Profile, ProfileError> {
    ProfileStore::new(&state.state)
        .load(vm)?
        .ok_or_else(|| ProfileError::NotFound { vm: vm.to_string() })
}
