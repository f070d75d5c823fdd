//! Fuzzes the data-path frame decoder with what a peer (or anything that reaches the port) may send:
//! arbitrary header bytes and payload. Decoding and verifying must never panic; whatever they accept
//! must encode back to the same header bytes (nothing in an accepted header is ignored).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vessel_proto::frame::{HEADER_LEN, decode, encode, verify};

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER_LEN {
        return;
    }
    let (head, payload) = data.split_at(HEADER_LEN);
    let bytes: [u8; HEADER_LEN] = head.try_into().expect("split at HEADER_LEN");
    let Ok(header) = decode(&bytes) else {
        return;
    };
    let Some(payload) = payload.get(..header.payload as usize) else {
        return;
    };
    if verify(&bytes, payload).is_ok() {
        assert_eq!(encode(&header, payload), bytes, "accepted header does not round-trip");
    }
});
