//! Every log line about a device names its volume, once: an operator grepping for a volume id
//! sees its whole story, from socket creation to disconnect, and the queue workers' lines too.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use vhost_backends::{BlkConfig, BlkDevice};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn device_log_lines_name_the_volume_once() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let vol = volume(8 * MIB);
    let id = vol.volume.layout().id.to_string();
    // A stale socket file, so that replacing it is logged too.
    let stale = std::os::unix::net::UnixListener::bind(vol.socket("log.sock")).unwrap();
    drop(stale);
    let device = BlkDevice::start(
        Arc::clone(&vol.volume),
        BlkConfig::new(vol.socket("log.sock")),
    )
    .unwrap();
    {
        let mut blkio = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
        blkio
            .set_str("path", vol.socket("log.sock").to_str().unwrap())
            .unwrap();
        blkio.connect().unwrap();
        let _queues = blkio.start().unwrap();
    }
    assert!(wait_until(Duration::from_secs(5), || !device.connected()));
    device.stop();

    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("vhost_backends"))
        .collect();
    for needle in [
        "replacing a stale socket",
        "device listening",
        "frontend connected",
        "ring starts",
        "queue worker stopped",
        "frontend disconnected",
        "device stopped",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(needle)),
            "no line says {needle:?} in:\n{text}"
        );
    }
    for line in &lines {
        assert_eq!(
            line.matches(&id).count(),
            1,
            "line must name the volume once: {line}"
        );
    }
}
