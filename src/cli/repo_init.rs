//! `livemount repo init DIR [--chunk-size SIZE]`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::repo::{ChunkSize, Repository};

#[derive(Debug, Args)]
pub struct RepoInitArgs {
    /// Directory for the new repository (created if missing; must be empty).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// Block size, a power of two from 64KiB to 4MiB; fixed for the repository's life.
    #[arg(long, value_name = "SIZE", default_value = "1MiB")]
    chunk_size: String,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: RepoInitArgs) -> anyhow::Result<ExitCode> {
    let cs = ChunkSize::parse(&a.chunk_size)?;
    let repo = Repository::init(&a.dir, cs)?;
    if a.json {
        super::print_json(&serde_json::json!({
            "path": repo.path(),
            "id": repo.id(),
            "chunk_size": cs.bytes(),
        }))?;
    } else {
        println!(
            "created repository {} (chunk size {cs}, id {})",
            repo.path().display(),
            repo.id()
        );
    }
    Ok(ExitCode::SUCCESS)
}
