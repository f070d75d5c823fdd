//! `vesseld`, the Vessel node daemon: argument parsing, configuration and wiring. The node's logic lives in
//! `vessel-control` (cluster state, admin API, metrics), `vstore` (disks and volumes) and `vhost-backends` (devices).

mod config;
mod devices;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use vessel_control::node::{NodeConfig, run_node};

use crate::config::Config;
use crate::devices::Devices;

/// The Vessel node daemon. With no arguments it runs a single-node cluster with its data (metadata, a file-backed
/// disk pool, the admin socket) in ./vessel-data.
#[derive(Debug, Parser)]
#[command(name = "vesseld", version)]
struct Args {
    /// TOML configuration file (see deploy/vesseld.toml for every key and its default).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory [default: ./vessel-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Admin API Unix socket [default: DATA_DIR/admin.sock].
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    /// IP:PORT for the admin API and peer traffic. A fresh node then waits for `vessel cluster init`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// IP:PORT of the Prometheus /metrics endpoint, or "off" [default: 127.0.0.1:9650].
    #[arg(long)]
    metrics: Option<String>,
}

fn main() {
    if let Err(error) = run() {
        // The subscriber may not be up yet: print plainly as well as through tracing.
        eprintln!("vesseld: error: {error:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(socket) = args.admin_socket {
        config.admin_socket = Some(socket);
    }
    if let Some(listen) = args.listen {
        config.listen = Some(listen);
    }
    if let Some(metrics) = args.metrics {
        config.metrics = metrics;
    }

    let filter = std::env::var("VESSEL_LOG").unwrap_or_else(|_| config.log.clone());
    // openraft narrates every election and membership step at info; its warnings are what an operator needs.
    let filter = if filter.contains("openraft") {
        filter
    } else {
        format!("{filter},openraft=warn")
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_new(&filter).with_context(|| format!("log filter '{filter}'"))?,
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();

    let node = NodeConfig {
        data_dir: config.data_dir.clone(),
        admin_socket: config.admin_socket(),
        listen: config.listen,
        metrics: config.metrics_addr()?,
        extent_size: config.extent_size_bytes()?,
        overcommit_ratio_milli: config.overcommit_milli()?,
        default_disk_size: config.default_disk_bytes()?,
        name: config.name.clone(),
        labels: config.labels.clone(),
        rebuild_rate: config.rebuild_rate_bytes()?,
        stale_replica_keep: config.stale_replica_keep()?,
        underlay: config.underlay_addr()?,
        switch: config.switch()?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("vesseld-async")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let devices = Arc::new(Devices::default());
        run_node(node, devices, shutdown_signal())
            .await
            .map_err(anyhow::Error::from)
    })
}

/// Resolves on SIGINT or SIGTERM: the daemon then stops serving devices (guests keep waiting to reconnect) and exits.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the daemon with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
    }
}
