//! A panic in a task is logged through the process's log (with the task's span), and the
//! process goes on: what a bug in one connection's code looks like to an operator. A test binary
//! of its own, since it sets the process's global log output and panic hook.

use std::time::Duration;

use tracing::Instrument as _;

#[tokio::test]
async fn a_panic_in_a_task_is_logged_with_its_connection_and_the_rest_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("wsbridge.log");
    wsbridge::logging::init_file(0, &log).unwrap();

    let span = tracing::info_span!("conn", client = "192.0.2.7");
    let task = tokio::spawn(
        async {
            tracing::info!("before the bug");
            let assumed: Option<u8> = std::hint::black_box(None);
            assumed.expect("a value the code assumed")
        }
        .instrument(span),
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), task).await.unwrap();
    // The test's own assertions report as usual from here on (the default hook back).
    drop(std::panic::take_hook());
    assert!(ended.unwrap_err().is_panic());
    // The process goes on, and so does its log.
    tracing::info!("after the bug");

    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("panic (a bug, please report it)"))
        .unwrap_or_else(|| panic!("no panic line in the log:\n{text}"));
    assert!(line.contains(" ERROR "), "{line}");
    assert!(line.contains("conn{client=192.0.2.7}"), "the task's span: {line}");
    assert!(line.contains("panic=\"a value the code assumed\""), "{line}");
    assert!(line.contains("location=tests/panics.rs:"), "{line}");
    assert!(text.lines().last().unwrap().contains("after the bug"), "{text}");
}
