//! How replies are printed: aligned tables for people, JSON (the API messages as they are) for scripts.

use std::time::{Duration, UNIX_EPOCH};

use clap::ValueEnum;
use serde::Serialize;
use vessel_proto::admin;
use vessel_proto::size::HumanSize;

use crate::exit::CliError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

fn json(value: &impl Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(error) => eprintln!("error: cannot encode the reply as JSON: {error}"),
    }
}

/// With `--output json`, errors are JSON on stdout too (and the one-line message still goes to stderr).
pub fn json_error(error: &CliError) {
    #[derive(Serialize)]
    struct ErrorReply<'a> {
        error: &'a CliError,
    }
    json(&ErrorReply { error });
}

/// Prints rows under a header, each column as wide as its widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  "));
            }
        }
        println!("{}", text.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn field(name: &str, value: impl std::fmt::Display) {
    println!("  {:<14}{value}", format!("{name}:"));
}

fn timestamp(unix: i64) -> String {
    let Ok(seconds) = u64::try_from(unix) else {
        return unix.to_string();
    };
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(seconds)).to_string()
}

pub fn cluster_init(out: Output, reply: &admin::ClusterInitReply) {
    if out == Output::Json {
        return json(reply);
    }
    let id = reply
        .status
        .as_ref()
        .map_or("", |status| status.cluster_id.as_str());
    if reply.initialized_now {
        println!("cluster {id} initialised");
    } else {
        println!("cluster {id} is already initialised; nothing to do");
    }
}

pub fn node_removed(out: Output, node: &admin::Node) {
    if out == Output::Json {
        return json(node);
    }
    println!(
        "node '{}' ({}) removed from the cluster; stop its vesseld",
        node.name, node.id
    );
}

pub fn node_draining(out: Output, node: &admin::Node) {
    if out == Output::Json {
        return json(node);
    }
    println!(
        "node '{}' ({}) is draining: its replicas are rebuilt on other nodes, then dropped from it \
         (`vessel volume show` shows the progress); `vessel node remove {}` works once it holds none",
        node.name, node.id, node.name
    );
}

pub fn node_joined(out: Output, reply: &admin::NodeJoinReply) {
    if out == Output::Json {
        return json(reply);
    }
    let (node, cluster) = reply.status.as_ref().map_or((0, ""), |status| {
        (status.node_id, status.cluster_id.as_str())
    });
    let role = if reply.voter { "a voter" } else { "a learner" };
    if reply.joined_now {
        println!("node {node} joined cluster {cluster} as {role}");
    } else {
        println!("node {node} is already a member of cluster {cluster} ({role}); nothing to do");
    }
}

pub fn cluster_status(out: Output, status: &admin::ClusterStatusReply) {
    if out == Output::Json {
        return json(status);
    }
    println!(
        "Cluster {}",
        if status.cluster_id.is_empty() {
            "(not initialised)"
        } else {
            &status.cluster_id
        }
    );
    field("state", &status.state);
    field("node", status.node_id);
    field(
        "leader",
        status
            .leader_id
            .map_or_else(|| "none".to_owned(), |id| id.to_string()),
    );
    field("term", status.term);
    field(
        "voters",
        status
            .voters
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    );
    field("nodes", status.nodes);
    field("volumes", status.volumes);
    field("capacity", HumanSize(status.capacity_bytes));
    field(
        "provisioned",
        format!(
            "{} of {} allowed (overcommit {:.2})",
            HumanSize(status.provisioned_bytes),
            HumanSize(provisionable(status)),
            status.overcommit_ratio
        ),
    );
    field("allocated", HumanSize(status.allocated_bytes));
    field("extent size", HumanSize(status.extent_size));
    if !status.failure_domain.is_empty() {
        field("failure domain", &status.failure_domain);
    }
    field("version", &status.version);
    for warning in &status.warnings {
        println!("warning: {warning}");
    }
}

fn provisionable(status: &admin::ClusterStatusReply) -> u64 {
    // Display only: the float covers capacities far beyond any pool.
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let limit = (status.capacity_bytes as f64 * status.overcommit_ratio) as u64;
    limit
}

pub fn nodes(out: Output, reply: &admin::NodeListReply) {
    if out == Output::Json {
        return json(reply);
    }
    let rows: Vec<Vec<String>> = reply
        .nodes
        .iter()
        .map(|node| {
            let mut labels: Vec<String> = node
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            labels.sort();
            vec![
                format!("{}{}", node.id, if node.leader { "*" } else { "" }),
                node.name.clone(),
                if node.address.is_empty() {
                    "-".to_owned()
                } else {
                    node.address.clone()
                },
                if node.reachable {
                    node.state.clone()
                } else {
                    format!("{} (unreachable)", node.state)
                },
                if node.role.is_empty() {
                    "-".to_owned()
                } else {
                    node.role.clone()
                },
                node.disks.to_string(),
                if node.reachable {
                    HumanSize(node.used_bytes).to_string()
                } else {
                    "?".to_owned()
                },
                if node.reachable {
                    HumanSize(node.capacity_bytes.saturating_sub(node.used_bytes)).to_string()
                } else {
                    "?".to_owned()
                },
                if labels.is_empty() {
                    "-".to_owned()
                } else {
                    labels.join(",")
                },
            ]
        })
        .collect();
    table(
        &[
            "ID", "NAME", "ADDRESS", "STATE", "ROLE", "DISKS", "USED", "FREE", "LABELS",
        ],
        &rows,
    );
}

pub fn disk_added(out: Output, disk: &admin::Disk) {
    if out == Output::Json {
        return json(disk);
    }
    println!(
        "disk {} added: {} ({} capacity)",
        disk.id,
        disk.path,
        HumanSize(disk.capacity_bytes)
    );
}

pub fn disk_removed(out: Output, disk: &admin::Disk) {
    if out == Output::Json {
        return json(disk);
    }
    println!("disk {} removed: {}", disk.id, disk.path);
}

pub fn disks(out: Output, reply: &admin::DiskListReply) {
    if out == Output::Json {
        return json(reply);
    }
    let rows: Vec<Vec<String>> = reply
        .disks
        .iter()
        .map(|disk| {
            vec![
                short_id(&disk.id).to_owned(),
                disk.node_id.to_string(),
                disk.path.clone(),
                if disk.block_device { "block" } else { "file" }.to_owned(),
                HumanSize(disk.capacity_bytes).to_string(),
                HumanSize(disk.used_bytes).to_string(),
                HumanSize(disk.capacity_bytes.saturating_sub(disk.used_bytes)).to_string(),
            ]
        })
        .collect();
    table(
        &["ID", "NODE", "PATH", "KIND", "CAPACITY", "USED", "FREE"],
        &rows,
    );
}

fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

pub fn volumes(out: Output, reply: &admin::VolumeListReply) {
    if out == Output::Json {
        return json(reply);
    }
    let rows: Vec<Vec<String>> = reply
        .volumes
        .iter()
        .map(|volume| {
            vec![
                volume.name.clone(),
                HumanSize(volume.size_bytes).to_string(),
                HumanSize(volume.allocated_bytes).to_string(),
                volume.block_size.to_string(),
                volume.replicas.to_string(),
                volume.attachment.as_ref().map_or_else(
                    || "-".to_owned(),
                    |attachment| attachment.vhost_user_socket.clone(),
                ),
                short_id(&volume.id).to_owned(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "SIZE",
            "ALLOCATED",
            "BLOCK",
            "REPLICAS",
            "ATTACHED",
            "ID",
        ],
        &rows,
    );
}

pub fn volume_changed(out: Output, verb: &str, volume: &admin::Volume) {
    if out == Output::Json {
        return json(volume);
    }
    match (verb, &volume.attachment) {
        ("attached", Some(attachment)) => println!(
            "volume {} attached: vhost-user-blk socket {} ({} queue{}{})",
            volume.name,
            attachment.vhost_user_socket,
            attachment.queues,
            if attachment.queues == 1 { "" } else { "s" },
            if attachment.read_only {
                ", read-only"
            } else {
                ""
            }
        ),
        _ => println!(
            "volume {} {verb} ({})",
            volume.name,
            HumanSize(volume.size_bytes)
        ),
    }
}

pub fn volume_deleted(out: Output, reply: &admin::VolumeDeleteReply) {
    if out == Output::Json {
        return json(reply);
    }
    println!(
        "volume {} deleted ({} freed)",
        reply.name,
        HumanSize(reply.freed_bytes)
    );
}

pub fn volume(out: Output, volume: &admin::Volume) {
    if out == Output::Json {
        return json(volume);
    }
    println!("Volume {}", volume.name);
    field("id", &volume.id);
    field(
        "size",
        format!(
            "{} ({} bytes)",
            HumanSize(volume.size_bytes),
            volume.size_bytes
        ),
    );
    field("block size", HumanSize(u64::from(volume.block_size)));
    field(
        "extents",
        format!(
            "{} of {} allocated ({} each)",
            volume.extents_allocated,
            volume.extents,
            HumanSize(volume.extent_size)
        ),
    );
    field("allocated", HumanSize(volume.allocated_bytes));
    field("replicas", volume.replicas);
    field("created", timestamp(volume.created_unix));
    match &volume.attachment {
        None => field("attached", "no"),
        Some(attachment) => field(
            "attached",
            format!(
                "{} on node {} ({} queue{}, {}, {})",
                attachment.vhost_user_socket,
                attachment.node_id,
                attachment.queues,
                if attachment.queues == 1 { "" } else { "s" },
                if attachment.read_only {
                    "read-only"
                } else {
                    "read-write"
                },
                match (attachment.connected, attachment.write_back) {
                    (false, _) => "waiting for a frontend",
                    (true, Some(true)) => "frontend connected, write-back cache",
                    (true, Some(false)) => "frontend connected, write-through",
                    (true, None) => "frontend connected",
                }
            ),
        ),
    }
    if let Some(stats) = &volume.stats {
        println!("I/O");
        field(
            "reads",
            format!("{} ({})", stats.reads, HumanSize(stats.read_bytes)),
        );
        field(
            "writes",
            format!("{} ({})", stats.writes, HumanSize(stats.write_bytes)),
        );
        field("flushes", stats.flushes);
        field("discards", stats.discards);
        field("write zeroes", stats.write_zeroes);
        field(
            "errors",
            format!(
                "{} ({} for lack of space)",
                stats.errors, stats.no_space_errors
            ),
        );
        field("latency", latency_summary(stats));
    }
    if !volume.placement.is_empty() {
        println!("Placement");
        let rows: Vec<Vec<String>> = volume
            .placement
            .iter()
            .map(|run| {
                let last = run.first_extent + run.count.saturating_sub(1);
                vec![
                    if run.count == 1 {
                        run.first_extent.to_string()
                    } else {
                        format!("{}-{last}", run.first_extent)
                    },
                    run.epoch.to_string(),
                    run.node_names.join(", "),
                    rebuild_state(run, volume.extent_size),
                ]
            })
            .collect();
        table(&["EXTENTS", "EPOCH", "REPLICAS", "REBUILD"], &rows);
    }
}

/// A run's rebuild as one cell: a progress bar, the percentage, the targets, rate and ETA; or the fenced-off nodes
/// it waits for.
fn rebuild_state(run: &admin::ExtentRun, extent_size: u64) -> String {
    if run.rebuild_targets.is_empty() {
        return if run.away.is_empty() {
            "-".to_owned()
        } else {
            waiting_for(&run.away)
        };
    }
    let count = run.count.max(1);
    let done = run.rebuilt_extents.min(count);
    let percent = done * 100 / count;
    let filled = usize::try_from(done * 20 / count).unwrap_or(20);
    let bar = format!("[{}{}]", "#".repeat(filled), "-".repeat(20 - filled));
    let elapsed = run
        .rebuild_reported_unix
        .saturating_sub(run.rebuild_started_unix);
    let timing = if done > 0 && elapsed > 0 {
        let rate = done * extent_size / u64::try_from(elapsed).unwrap_or(1).max(1);
        let left = (count - done) * extent_size / rate.max(1);
        format!(
            ", {}/s, ETA {}",
            HumanSize(rate),
            humantime::format_duration(Duration::from_secs(left))
        )
    } else {
        String::new()
    };
    let catching_up = if run
        .rebuild_targets
        .iter()
        .any(|target| run.away.iter().any(|away| away.node == *target))
    {
        " (catching up: changed extents only)"
    } else {
        ""
    };
    format!(
        "{bar} {percent}% to {}{timing}{catching_up}",
        run.rebuild_target_names.join(", ")
    )
}

/// The nodes a run short of replicas waits for, e.g. "waiting for c (away 2m, 3 extent(s) changed; copied in full
/// elsewhere after 8m)".
fn waiting_for(away: &[admin::AwayReplica]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let span = |seconds: i64| {
        humantime::format_duration(Duration::from_secs(u64::try_from(seconds).unwrap_or(0)))
    };
    let nodes: Vec<String> = away
        .iter()
        .map(|away| {
            let left = away.catch_up_until_unix - now;
            let after = if left > 0 {
                format!("copied in full elsewhere after {}", span(left))
            } else {
                "past the catch-up window: copied in full to the first node that can take it"
                    .to_owned()
            };
            format!(
                "{} (away {}, {} extent(s) changed; {after})",
                away.node_name,
                span(now - away.since_unix),
                away.changed_extents
            )
        })
        .collect();
    format!("waiting for {}", nodes.join(", "))
}

/// Percentiles from the histogram: each is the upper bound of the bucket it falls in.
fn latency_summary(stats: &admin::VolumeStats) -> String {
    let total: u64 = stats.bucket_counts.iter().sum();
    if total == 0 {
        return "no requests yet".to_owned();
    }
    let percentile = |fraction_per_mille: u64| {
        let rank = (total * fraction_per_mille).div_ceil(1000);
        let mut seen = 0;
        for (index, count) in stats.bucket_counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return stats
                    .bucket_bounds_us
                    .get(index)
                    .map_or_else(|| "> max".to_owned(), |bound| format!("≤ {bound} µs"));
            }
        }
        "> max".to_owned()
    };
    format!(
        "mean {} µs, p50 {}, p99 {}",
        stats.latency_sum_us / total,
        percentile(500),
        percentile(990)
    )
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

pub fn network_created(out: Output, network: &admin::Network) {
    if out == Output::Json {
        return json(network);
    }
    println!(
        "network {} created (id {}, VNI {}, MTU {}{})",
        network.name,
        network.id,
        network.vni,
        network.mtu,
        if network.subnet.is_empty() {
            String::new()
        } else {
            format!(", subnet {}", network.subnet)
        }
    );
}

pub fn network_deleted(out: Output, reply: &admin::NetworkDeleteReply) {
    if out == Output::Json {
        return json(reply);
    }
    match reply.deleted_ports.len() {
        0 => println!("network {} deleted", reply.name),
        ports => println!("network {} deleted with its {ports} port(s)", reply.name),
    }
}

pub fn networks(out: Output, reply: &admin::NetworkListReply) {
    if out == Output::Json {
        return json(reply);
    }
    let rows: Vec<Vec<String>> = reply
        .networks
        .iter()
        .map(|network| {
            vec![
                network.name.clone(),
                network.id.to_string(),
                network.vni.to_string(),
                network.mtu.to_string(),
                or_dash(&network.subnet),
                network.port_count.to_string(),
                or_dash(&network.node_names.join(",")),
            ]
        })
        .collect();
    table(
        &["NAME", "ID", "VNI", "MTU", "SUBNET", "PORTS", "NODES"],
        &rows,
    );
}

pub fn network(out: Output, network: &admin::Network) {
    if out == Output::Json {
        return json(network);
    }
    println!("Network {}", network.name);
    field("id", network.id);
    field("vni", network.vni);
    field("mtu", network.mtu);
    field(
        "subnet",
        if network.subnet.is_empty() {
            "none"
        } else {
            &network.subnet
        },
    );
    field("created", timestamp(network.created_unix));
    field(
        "nodes",
        if network.node_names.is_empty() {
            "none (no ports yet)".to_owned()
        } else {
            network.node_names.join(", ")
        },
    );
    field("ports", network.port_count);
    if !network.ports.is_empty() {
        println!("Ports");
        port_table(&network.ports, false);
    }
}

/// A port's socket path or tap name: what it is known by on its node.
fn endpoint(port: &admin::Port) -> &str {
    if port.tap.is_empty() {
        &port.vhost_user_socket
    } else {
        &port.tap
    }
}

fn port_table(ports: &[admin::Port], with_network: bool) {
    let rows: Vec<Vec<String>> = ports
        .iter()
        .map(|port| {
            let mut row = vec![port.id.to_string()];
            if with_network {
                row.push(port.network.clone());
            }
            row.extend([
                port.node.clone(),
                port.kind.clone(),
                endpoint(port).to_owned(),
                port.queues.to_string(),
                port.mac.clone(),
                or_dash(&port.ip),
                if port.allow_any_mac { "yes" } else { "no" }.to_owned(),
            ]);
            match &port.counters {
                Some(c) => row.extend([
                    c.rx_packets.to_string(),
                    c.tx_packets.to_string(),
                    c.drops.values().sum::<u64>().to_string(),
                ]),
                None => row.extend(["-".to_owned(), "-".to_owned(), "-".to_owned()]),
            }
            row
        })
        .collect();
    let mut header = vec!["ID"];
    if with_network {
        header.push("NETWORK");
    }
    header.extend([
        "NODE",
        "KIND",
        "SOCKET/TAP",
        "QUEUES",
        "MAC",
        "IP",
        "ANY-MAC",
        "RX PKTS",
        "TX PKTS",
        "DROPS",
    ]);
    table(&header, &rows);
}

pub fn ports(out: Output, reply: &admin::PortListReply) {
    if out == Output::Json {
        return json(reply);
    }
    port_table(&reply.ports, true);
}

pub fn port_changed(out: Output, verb: &str, port: &admin::Port) {
    if out == Output::Json {
        return json(port);
    }
    println!(
        "port {} {verb}: {} {} in network {} on node {} (MAC {}{})",
        port.id,
        port.kind,
        endpoint(port),
        port.network,
        port.node,
        port.mac,
        if port.ip.is_empty() {
            String::new()
        } else {
            format!(", IP {}", port.ip)
        }
    );
}

pub fn port(out: Output, port: &admin::Port) {
    if out == Output::Json {
        return json(port);
    }
    println!("Port {}", port.id);
    field("network", format!("{} ({})", port.network, port.network_id));
    field("node", format!("{} ({})", port.node, port.node_id));
    if port.tap.is_empty() {
        field("vhost-user", &port.vhost_user_socket);
        field("socket mode", format!("{:04o}", port.socket_mode));
    } else {
        field("tap", &port.tap);
    }
    field("queues", port.queues);
    field("mac", &port.mac);
    field("ip", if port.ip.is_empty() { "none" } else { &port.ip });
    field(
        "port security",
        if port.allow_any_mac {
            "off (--allow-any-mac)"
        } else {
            "on (its own MAC and IP only)"
        },
    );
    field("created", timestamp(port.created_unix));
    match &port.counters {
        Some(c) => {
            if let Some(connected) = c.frontend_connected {
                field(
                    "frontend",
                    if connected {
                        "connected"
                    } else {
                        "none connected (start the VM with this socket; QEMU reconnects by itself)"
                    },
                );
            }
            field(
                "rx",
                format!("{} packets, {} bytes", c.rx_packets, c.rx_bytes),
            );
            field(
                "tx",
                format!("{} packets, {} bytes", c.tx_packets, c.tx_bytes),
            );
            let mut drops: Vec<(&String, &u64)> = c.drops.iter().collect();
            drops.sort();
            field(
                "drops",
                if drops.is_empty() {
                    "none".to_owned()
                } else {
                    drops
                        .iter()
                        .map(|(reason, count)| format!("{reason} {count}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            );
        }
        None => field("traffic", "not served by its node's switch (yet)"),
    }
}
