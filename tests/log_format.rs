//! `log_format = "json"`: every line the server writes is one JSON object
//! that a log shipper can take as it is.

mod common;

use common::{Peer, ServerProcess, temp_dir};
use serde_json::Value;

#[test]
fn json_logs_are_one_object_per_line_with_the_same_messages() {
    let dir = temp_dir("json-logs");
    let mut server = ServerProcess::start(
        &dir,
        "listen = [\"127.0.0.1:0\"]\nrestart_grace_ms = 0\nlog_format = \"json\"\n",
    );
    let mut peer = Peer::connect(server.addr);
    peer.send_body(b"{not json");
    assert_eq!(peer.recv()["error"], "invalidJson");
    drop(peer);
    let bad = server.wait_for_log("bad message");
    server.signal("TERM");
    server.wait_exit();
    let mut lines = vec![bad];
    // Up to the end of its stderr, which ends the reader's channel.
    while let Ok(line) = server.log.recv_timeout(common::PATIENCE) {
        lines.push(line);
    }
    assert!(lines.len() > 3, "{lines:?}");
    for line in &lines {
        let record: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object: {line:?}: {e}"));
        for key in ["ts", "level", "target", "msg"] {
            assert!(record[key].is_string(), "{key} missing: {line}");
        }
        assert!(record["ts"].as_str().unwrap().ends_with('Z'), "{line}");
    }
    let first: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["level"], "WARN", "{first}");
    assert!(
        first["msg"].as_str().unwrap().contains("bad message"),
        "{first}"
    );
}
