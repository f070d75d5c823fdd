//! QEMU guests for end-to-end tests: a Debian kernel and a busybox initramfs, booted under software
//! emulation (TCG), driven through a shell on the serial console.
//!
//! [`GuestImage::get`] builds (once, cached) the kernel + initramfs; [`Guest::boot`] starts QEMU with
//! shared guest memory (so vhost-user backends can map it) and any number of vhost-user-blk disks,
//! and returns at the guest's shell; [`Guest::run`] runs one shell command and returns its output and
//! exit status. A [`Guest`] owns its QEMU process: dropping it kills QEMU, also when a test panics,
//! and then keeps the console log on disk and prints where it is.
//!
//! ```no_run
//! use std::time::Duration;
//! use vessel_tests::guest::{Guest, GuestConfig, GuestImage, VhostUserBlkDisk};
//!
//! # fn main() -> anyhow::Result<()> {
//! let image = GuestImage::get()?;
//! let config = GuestConfig {
//!     disks: vec![VhostUserBlkDisk { socket: "/tmp/vol.sock".into(), queues: 2, reconnect: true }],
//!     ..GuestConfig::default()
//! };
//! let mut guest = Guest::boot(&image, config)?;
//! let out = guest.run_ok("fio --name=w --filename=/dev/vda --rw=write --size=4M --direct=1", Duration::from_secs(60))?;
//! guest.shutdown()?;
//! # let _ = out; Ok(()) }
//! ```

mod console;
mod image;
mod vm;

pub use image::GuestImage;
pub use vm::{CommandOutput, Guest, GuestConfig, VhostUserBlkDisk, running_as_root};
