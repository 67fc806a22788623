//! `cargo fuzz run config_parsers`: the daemon's TOML configuration, its
//! `--export NAME=PATH[,...]` flag and sizes, on arbitrary text.
#![no_main]

#[allow(dead_code)]
#[path = "../../daemon/src/config.rs"]
mod config;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    config::exercise_parsers(data);
});
