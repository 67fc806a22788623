//! The progress line of long-running commands (bench, verify, soak): one
//! line redrawn in place on a terminal; in a log (CI, journald) a plain
//! line every few seconds instead of a stream of carriage returns.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often a log gets a line.
const LOG_EVERY: Duration = Duration::from_secs(5);

pub(crate) struct ProgressLine {
    tty: bool,
    last_logged: Option<Instant>,
}

impl ProgressLine {
    pub(crate) fn new() -> Self {
        ProgressLine {
            tty: std::io::stderr().is_terminal(),
            last_logged: None,
        }
    }

    /// Shows `text` as the current state.
    pub(crate) fn show(&mut self, text: std::fmt::Arguments<'_>) {
        if self.tty {
            eprint!("\r{text}   ");
            let _ = std::io::stderr().flush();
        } else if self.last_logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            self.last_logged = Some(Instant::now());
            eprintln!("{text}");
        }
    }

    /// Ends the line on a terminal.
    pub(crate) fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
