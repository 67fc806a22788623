//! `cargo fuzz run server_frames`: the server engine against arbitrary
//! frames, connections, time and backend results.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = braid_core::testkit::exercise_server(data);
});
