//! Arbitrary bytes → the control socket's request decoder, exactly as the daemon's `serve`
//! reads a request: at most `control::MAX_REQUEST` bytes, up to and including the first
//! newline, as UTF-8 (tokio's `read_line` refuses anything else), then
//! `serde_json::from_str::<Request>`. Never panics; a request that decodes re-encodes to one
//! line that decodes to the same request (the client's side of the wire).
#![no_main]

use agentseg::control::{MAX_REQUEST, Reply, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bounded = &data[..data.len().min(MAX_REQUEST)];
    let line = match bounded.iter().position(|&b| b == b'\n') {
        Some(end) => &bounded[..=end],
        None => bounded,
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return;
    };
    if let Ok(request) = serde_json::from_str::<Request>(line) {
        let text = serde_json::to_string(&request).expect("a decoded request encodes");
        assert!(
            !text.contains('\n'),
            "request encodes to several lines: {text}"
        );
        let again: Request = serde_json::from_str(&text).expect("an encoded request decodes");
        assert_eq!(again, request, "request changed through the wire: {text}");
    }
    // The client decodes the daemon's reply line the same way.
    let _ = serde_json::from_str::<Reply>(line);
});
