//! `livemount repo init DIR|s3://BUCKET/PREFIX [--chunk-size SIZE]`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::RepoFile;
use crate::repo::{ChunkSize, RepoLocation, Repository};

#[derive(Debug, Args)]
pub struct RepoInitArgs {
    /// Where the new repository goes: a directory (created if missing; must be empty), or
    /// s3://BUCKET/PREFIX (the bucket must exist; nothing may be stored under the prefix yet).
    #[arg(value_name = "DIR|s3://BUCKET/PREFIX")]
    location: String,
    /// Block size, a power of two from 64KiB to 4MiB; fixed for the repository's life.
    #[arg(long, value_name = "SIZE", default_value = "1MiB")]
    chunk_size: String,
    /// A TOML file with a [repository] section: how to reach object storage.
    #[arg(long, env = "LIVEMOUNT_REPO_CONFIG", value_name = "FILE")]
    repo_config: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: RepoInitArgs) -> anyhow::Result<ExitCode> {
    let cs = ChunkSize::parse(&a.chunk_size)?;
    let location = RepoLocation::parse(&a.location)?;
    let file = match &a.repo_config {
        Some(path) => RepoFile::read(path)?,
        None => RepoFile::default(),
    };
    let repo = Repository::init_at(&location, &file.repository.unwrap_or_default(), cs).await?;
    if a.json {
        super::print_json(&serde_json::json!({
            "path": repo.location(),
            "id": repo.id(),
            "chunk_size": cs.bytes(),
        }))?;
    } else {
        println!(
            "created repository {} (chunk size {cs}, id {})",
            repo.location(),
            repo.id()
        );
    }
    Ok(ExitCode::SUCCESS)
}
