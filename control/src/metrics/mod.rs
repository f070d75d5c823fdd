//! Prometheus metrics of a node: per-volume I/O counters and latency histograms for the volumes it serves, the
//! size and allocation of every volume, its disks' use, and the cluster's capacity and Raft position.
//!
//! The text is rendered on each scrape from the live counters (no second copy of them is kept), in the Prometheus
//! text exposition format 0.0.4.

mod http;

use std::fmt::Write;

pub use http::{Render, serve};

use crate::node::LocalNode;

/// Escapes a label value (`\`, `"` and newlines), as the exposition format requires.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
        }
    }
}

/// The whole exposition text for `node`.
pub fn render(node: &LocalNode) -> String {
    let mut out = String::new();
    let mut family = Family { out: &mut out };
    let raft = node.control().raft_status();
    let node_id = node.control().node_id();

    family.header(
        "vessel_raft_term",
        "gauge",
        "Current Raft term seen by this node.",
    );
    family.sample("vessel_raft_term", "", raft.term);
    family.header(
        "vessel_raft_leader",
        "gauge",
        "1 if this node is the Raft leader.",
    );
    family.sample(
        "vessel_raft_leader",
        "",
        u8::from(raft.leader == Some(node_id)),
    );
    family.header(
        "vessel_raft_last_applied",
        "gauge",
        "Index of the last log entry applied to the cluster state.",
    );
    family.sample(
        "vessel_raft_last_applied",
        "",
        raft.last_applied_index.unwrap_or(0),
    );

    let (volumes, capacity, provisioned) = node.control().read(|state| {
        (
            state.volumes.values().cloned().collect::<Vec<_>>(),
            state.capacity_bytes(),
            state.provisioned_bytes(),
        )
    });
    family.header(
        "vessel_cluster_capacity_bytes",
        "gauge",
        "Capacity of all disks in the cluster.",
    );
    family.sample("vessel_cluster_capacity_bytes", "", capacity);
    family.header(
        "vessel_cluster_provisioned_bytes",
        "gauge",
        "Bytes provisioned by all volumes (size x replicas).",
    );
    family.sample("vessel_cluster_provisioned_bytes", "", provisioned);

    if let Some(pool) = node.pool() {
        let disks: Vec<(String, vstore::DiskInfo)> = pool
            .disks()
            .into_iter()
            .map(|disk| {
                (
                    format!(
                        "disk=\"{}\",path=\"{}\"",
                        disk.id,
                        label(&disk.path.display().to_string())
                    ),
                    disk,
                )
            })
            .collect();
        family.header(
            "vessel_disk_capacity_bytes",
            "gauge",
            "Capacity of a local disk.",
        );
        for (labels, disk) in &disks {
            family.sample("vessel_disk_capacity_bytes", labels, disk.capacity);
        }
        family.header(
            "vessel_disk_used_bytes",
            "gauge",
            "Bytes of a local disk allocated to extents.",
        );
        for (labels, disk) in &disks {
            family.sample("vessel_disk_used_bytes", labels, disk.used);
        }
        let allocated: std::collections::HashMap<_, _> =
            pool.volumes_on_disk().into_iter().collect();
        family.header(
            "vessel_volume_size_bytes",
            "gauge",
            "Provisioned size of a volume.",
        );
        for volume in &volumes {
            let labels = format!("volume=\"{}\",id=\"{}\"", label(&volume.name), volume.id);
            family.sample("vessel_volume_size_bytes", &labels, volume.size);
        }
        family.header(
            "vessel_volume_allocated_bytes",
            "gauge",
            "Bytes of a volume allocated on this node's disks.",
        );
        for volume in &volumes {
            let labels = format!("volume=\"{}\",id=\"{}\"", label(&volume.name), volume.id);
            let extents = allocated.get(&volume.id).copied().unwrap_or(0);
            family.sample(
                "vessel_volume_allocated_bytes",
                &labels,
                extents.saturating_mul(volume.extent_size),
            );
        }
    }

    render_io(&mut family, node, &volumes);
    render_switch(&mut family, node);
    out
}

/// The switch: traffic and drops of the ports this node serves, and its networks' MAC tables.
fn render_switch(family: &mut Family<'_>, node: &LocalNode) {
    let ports = node.port_counters();
    let names = node.control().read(|state| {
        ports
            .keys()
            .filter_map(|id| {
                let port = state.ports.get(id)?;
                Some((
                    *id,
                    (
                        state.network_label(port.network),
                        port.kind.endpoint().to_owned(),
                    ),
                ))
            })
            .collect::<std::collections::HashMap<_, _>>()
    });
    let port_labels = |id: &u64| {
        let (network, endpoint) = names.get(id).cloned().unwrap_or_default();
        format!(
            "port=\"{id}\",network=\"{}\",endpoint=\"{}\"",
            label(&network),
            label(&endpoint)
        )
    };
    type PortCounter = (
        &'static str,
        &'static str,
        fn(&crate::raft::PortCounters) -> u64,
    );
    let counters: [PortCounter; 4] = [
        (
            "vessel_port_rx_packets_total",
            "Frames a port sent into the switch.",
            |c| c.rx_packets,
        ),
        (
            "vessel_port_rx_bytes_total",
            "Bytes a port sent into the switch.",
            |c| c.rx_bytes,
        ),
        (
            "vessel_port_tx_packets_total",
            "Frames the switch handed to a port.",
            |c| c.tx_packets,
        ),
        (
            "vessel_port_tx_bytes_total",
            "Bytes the switch handed to a port.",
            |c| c.tx_bytes,
        ),
    ];
    for (name, help, read) in counters {
        family.header(name, "counter", help);
        for (id, port) in &ports {
            family.sample(name, &port_labels(id), read(port));
        }
    }
    family.header(
        "vessel_port_drops_total",
        "counter",
        "Frames of a port dropped by the switch, by reason.",
    );
    for (id, port) in &ports {
        for (reason, count) in &port.drops {
            let labels = format!("{},reason=\"{}\"", port_labels(id), label(reason));
            family.sample("vessel_port_drops_total", &labels, count);
        }
    }
    family.header(
        "vessel_port_frontend_connected",
        "gauge",
        "1 while a frontend (the VM) is connected to a vhost-user port's socket, else 0.",
    );
    for (id, port) in &ports {
        if let Some(connected) = port.frontend_connected {
            family.sample(
                "vessel_port_frontend_connected",
                &port_labels(id),
                u8::from(connected),
            );
        }
    }
    family.header(
        "vessel_network_mac_entries",
        "gauge",
        "MAC addresses a network's MAC table on this node holds (learned and static).",
    );
    for (id, stats) in node.network_stats() {
        let network = node.control().read(|state| state.network_label(id));
        family.sample(
            "vessel_network_mac_entries",
            &format!("network=\"{}\"", label(&network)),
            stats.mac_entries,
        );
    }
}

/// A per-volume counter family: name, help text, and how to read it from a snapshot.
type Counter = (
    &'static str,
    &'static str,
    fn(&vstore::StatsSnapshot) -> u64,
);

/// Counters of the volumes this node serves (their counters start when the daemon does).
fn render_io(family: &mut Family<'_>, node: &LocalNode, volumes: &[crate::state::Volume]) {
    let served: Vec<(String, vstore::StatsSnapshot)> = node
        .open_volumes()
        .iter()
        .map(|open| {
            let id = open.layout().id;
            let name = volumes
                .iter()
                .find(|volume| volume.id == id)
                .map_or_else(|| id.to_string(), |v| v.name.clone());
            (
                format!("volume=\"{}\",id=\"{id}\"", label(&name)),
                open.stats().snapshot(),
            )
        })
        .collect();
    let counters: [Counter; 10] = [
        (
            "vessel_volume_reads_total",
            "Read requests completed.",
            |s| s.reads,
        ),
        (
            "vessel_volume_writes_total",
            "Write requests completed.",
            |s| s.writes,
        ),
        (
            "vessel_volume_flushes_total",
            "Flush requests completed.",
            |s| s.flushes,
        ),
        (
            "vessel_volume_discards_total",
            "Discard requests completed.",
            |s| s.discards,
        ),
        (
            "vessel_volume_write_zeroes_total",
            "Write-zeroes requests completed.",
            |s| s.write_zeroes,
        ),
        (
            "vessel_volume_read_bytes_total",
            "Bytes read by the guest.",
            |s| s.read_bytes,
        ),
        (
            "vessel_volume_written_bytes_total",
            "Bytes written by the guest.",
            |s| s.write_bytes,
        ),
        (
            "vessel_volume_errors_total",
            "Requests that completed with an error.",
            |s| s.errors,
        ),
        (
            "vessel_volume_no_space_errors_total",
            "Writes refused because the pool was full.",
            |s| s.no_space_errors,
        ),
        (
            "vessel_volume_get_id_total",
            "GET_ID requests completed.",
            |s| s.get_ids,
        ),
    ];
    for (name, help, value) in counters {
        family.header(name, "counter", help);
        for (labels, stats) in &served {
            family.sample(name, labels, value(stats));
        }
    }
    let name = "vessel_volume_request_duration_seconds";
    family.header(
        name,
        "histogram",
        "Time from a request's arrival to its completion.",
    );
    for (labels, stats) in &served {
        for (bound, count) in stats.latency.cumulative() {
            let le = bound.map_or_else(|| "+Inf".to_owned(), |us| format!("{}", us as f64 / 1e6));
            family.sample(
                &format!("{name}_bucket"),
                &format!("{labels},le=\"{le}\""),
                count,
            );
        }
        family.sample(
            &format!("{name}_sum"),
            labels,
            stats.latency.sum_us as f64 / 1e6,
        );
        family.sample(&format!("{name}_count"), labels, stats.latency.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("db1"), "db1");
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
