//! `cargo fuzz run nbd_negotiation`: an NBD connection fed arbitrary bytes
//! from its first byte (options, STARTTLS, INFO/GO, meta contexts).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut input = data.to_vec();
    if let Some(mode) = input.first_mut() {
        *mode &= !1;
    }
    braid_frontend_nbd::exercise_nbd(&input);
});
