//! The `livemount` binary: sets up the runtime, logging and the file creation mask, runs the
//! CLI, and is the only place that exits the process.

use std::process::ExitCode;

fn main() -> ExitCode {
    limit_malloc_arenas();
    // Private unless the operator says otherwise (`--umask`): overlays hold what VMs wrote and
    // the repository holds whole disks (docs/decisions/0013-private-files-by-umask.md).
    livemount::durable::set_umask(livemount::durable::Umask::PRIVATE);
    let filter = tracing_subscriber::EnvFilter::try_from_env("LIVEMOUNT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,fatfs=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(livemount::cli::run()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// glibc gives each thread that allocates its own arena (up to 8 per core) and keeps freed
/// memory in it. The read path allocates and frees 1 MiB chunk buffers on many blocking
/// threads, so with per-thread arenas the server's RSS settled near the cache size plus
/// 200 MiB under `scripts/load-test`; with two arenas, the cache size plus about 35 MiB at the
/// same throughput (docs/decisions/0008-malloc-arenas.md).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before any other thread
    // exists, and a refusal (return 0) leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// The error and its causes, leaving out a cause whose text the message already includes
/// (our error messages name their cause; anyhow's contexts do not).
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}
