//! `cargo fuzz run nbd_transmission`: arbitrary requests after a valid
//! handshake (simple or structured replies, read-only or writable).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut input = data.to_vec();
    if let Some(mode) = input.first_mut() {
        *mode |= 1;
    }
    braid_frontend_nbd::exercise_nbd(&input);
});
