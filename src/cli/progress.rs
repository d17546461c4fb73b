//! Progress bars: drawn on stderr when it is a terminal, nothing otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::repo::Progress;

/// A progress bar for byte counts (`bytes`) or item counts.
pub struct Bar(ProgressBar);

impl Bar {
    /// A bar for `what`, hidden when stderr is not a terminal or `quiet` is set.
    pub fn new(what: &str, bytes: bool, quiet: bool) -> Self {
        let target = if quiet || !std::io::stderr().is_terminal() {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(None, target);
        let template = if bytes {
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        } else {
            "{msg} [{bar:30}] {pos}/{len} eta {eta}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what.to_string());
        Bar(bar)
    }

    /// Sets how much is done (for work polled rather than counted).
    pub fn set_position(&self, n: u64) {
        self.0.set_position(n);
    }

    /// Prints a line on stdout without tearing the bar.
    pub fn line(&self, text: &str) {
        self.0.suspend(|| println!("{text}"));
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Bar {
    fn set_total(&self, n: u64) {
        self.0.set_length(n);
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
}
