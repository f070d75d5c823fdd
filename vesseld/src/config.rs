//! The daemon's configuration: a TOML file whose every key has a default that works on one machine, overridden by
//! command-line flags. `deploy/vesseld.toml` shows every key with its default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use vessel_proto::size::parse_size;

/// Everything `vesseld` reads at start-up.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the node keeps its metadata (Raft log and state), its default disk and its admin socket.
    pub data_dir: PathBuf,
    /// The admin API's Unix socket; default DATA_DIR/admin.sock. Created mode 0600.
    pub admin_socket: Option<PathBuf>,
    /// IP:PORT for the admin API and peer traffic over TCP. None: no TCP listener (single-node mode).
    pub listen: Option<SocketAddr>,
    /// IP:PORT of the Prometheus /metrics endpoint; "off" disables it. Port 0 picks a free port (written to
    /// DATA_DIR/metrics.addr).
    pub metrics: String,
    /// Size of every extent, the unit of thin allocation and placement (binary units, e.g. "64M").
    /// Read once, when the cluster is initialised.
    pub extent_size: String,
    /// How far provisioned volume sizes may exceed the pool's capacity (2.0 = twice). Read at cluster init.
    pub overcommit_ratio: f64,
    /// In single-node mode, the size of the sparse file disk created in DATA_DIR/disks on first start
    /// ("0" = create none).
    pub default_disk_size: String,
    /// Log filter, as in RUST_LOG (e.g. "info", "vstore=debug"); the VESSEL_LOG variable overrides it.
    pub log: String,
    /// This node's name in the cluster (unique); default: the host name (with the node id added if another node
    /// of the cluster has that name already).
    pub name: Option<String>,
    /// Failure-domain labels of this node (e.g. `rack = "r1"`), recorded when it initialises or joins a cluster.
    pub labels: BTreeMap<String, String>,
    /// Most bytes per second one rebuild this node drives copies (binary units, e.g. "256M"); "0" for no limit.
    pub rebuild_rate: String,
    /// How long a replica this node was fenced off from (it failed, was cut off or drained) stays on its disks
    /// before its space is freed, e.g. "15m". Shorter than ten minutes takes away a returning node's catch-up.
    pub stale_replica_keep: String,
    /// IP:PORT this node's switch sends and receives VXLAN on (the other nodes reach its networks there).
    /// Default: the --listen IP with UDP port 4789 (127.0.0.1:4789 without --listen). Port 0 picks a free port.
    pub underlay: Option<String>,
    /// Most MAC addresses the switch learns per network; a full table floods frames to further addresses instead
    /// of learning them (counted). At least 1.
    pub mac_table_limit: usize,
    /// How long the switch remembers a learned MAC address without traffic from it, e.g. "5m".
    pub mac_aging: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("vessel-data"),
            admin_socket: None,
            listen: None,
            metrics: "127.0.0.1:9650".to_owned(),
            extent_size: "64M".to_owned(),
            overcommit_ratio: 2.0,
            default_disk_size: "16G".to_owned(),
            log: "info".to_owned(),
            name: None,
            labels: BTreeMap::new(),
            rebuild_rate: "256M".to_owned(),
            stale_replica_keep: "15m".to_owned(),
            underlay: None,
            mac_table_limit: vnet::mac_table::DEFAULT_LIMIT,
            mac_aging: "5m".to_owned(),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("config file {} is not valid", path.display()))
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.sock"))
    }

    pub fn metrics_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        if self.metrics == "off" {
            return Ok(None);
        }
        let addr = self.metrics.parse().with_context(|| {
            format!(
                "metrics address '{}' is not IP:PORT (or \"off\")",
                self.metrics
            )
        })?;
        Ok(Some(addr))
    }

    pub fn extent_size_bytes(&self) -> anyhow::Result<u64> {
        let bytes = parse_size(&self.extent_size).with_context(|| "extent_size in the config")?;
        if !bytes.is_power_of_two() || !(1 << 20..=1 << 30).contains(&bytes) {
            bail!(
                "extent_size {} must be a power of two between 1M and 1G",
                self.extent_size
            );
        }
        Ok(bytes)
    }

    pub fn default_disk_bytes(&self) -> anyhow::Result<u64> {
        parse_size(&self.default_disk_size).with_context(|| "default_disk_size in the config")
    }

    pub fn rebuild_rate_bytes(&self) -> anyhow::Result<u64> {
        parse_size(&self.rebuild_rate).with_context(|| "rebuild_rate in the config")
    }

    pub fn stale_replica_keep(&self) -> anyhow::Result<std::time::Duration> {
        humantime::parse_duration(&self.stale_replica_keep).with_context(|| {
            format!(
                "stale_replica_keep '{}' in the config is not a duration (e.g. \"15m\")",
                self.stale_replica_keep
            )
        })
    }

    pub fn underlay_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        self.underlay
            .as_deref()
            .map(|text| {
                text.parse().with_context(|| {
                    format!(
                        "underlay '{text}' in the config is not IP:PORT (e.g. \"10.0.0.5:4789\")"
                    )
                })
            })
            .transpose()
    }

    pub fn switch(&self) -> anyhow::Result<vnet::SwitchConfig> {
        if self.mac_table_limit == 0 {
            bail!("mac_table_limit in the config must be at least 1");
        }
        let mac_aging = humantime::parse_duration(&self.mac_aging).with_context(|| {
            format!(
                "mac_aging '{}' in the config is not a duration (e.g. \"5m\")",
                self.mac_aging
            )
        })?;
        if mac_aging.is_zero() {
            bail!("mac_aging in the config must be longer than 0 (e.g. \"5m\")");
        }
        Ok(vnet::SwitchConfig {
            mac_limit: self.mac_table_limit,
            mac_aging,
        })
    }

    pub fn overcommit_milli(&self) -> anyhow::Result<u32> {
        if !(1.0..=100.0).contains(&self.overcommit_ratio) {
            bail!(
                "overcommit_ratio {} must be between 1.0 and 100.0",
                self.overcommit_ratio
            );
        }
        // In range by the check above, so the cast is exact enough and cannot overflow.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let milli = (self.overcommit_ratio * 1000.0).round() as u32;
        Ok(milli)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_run_a_single_node_cluster_in_the_current_directory() {
        let config = Config::default();
        assert_eq!(
            config.admin_socket(),
            PathBuf::from("vessel-data/admin.sock")
        );
        assert_eq!(config.listen, None);
        assert_eq!(config.extent_size_bytes().unwrap(), 64 << 20);
        assert_eq!(config.overcommit_milli().unwrap(), 2000);
        assert_eq!(
            config.metrics_addr().unwrap(),
            Some("127.0.0.1:9650".parse().unwrap())
        );
    }

    #[test]
    fn a_config_file_overrides_defaults_and_rejects_unknown_keys() {
        let config: Config =
            toml::from_str("data_dir = \"/var/lib/vessel\"\nextent_size = \"128M\"\n").unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/vessel"));
        assert_eq!(config.extent_size_bytes().unwrap(), 128 << 20);
        assert_eq!(config.overcommit_ratio, 2.0);
        let error = toml::from_str::<Config>("extent_sise = \"1G\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("extent_sise"), "{error}");
    }

    #[test]
    fn the_shipped_config_file_is_valid_and_holds_the_defaults() {
        let shipped: Config = toml::from_str(include_str!("../../deploy/vesseld.toml")).unwrap();
        let defaults = Config::default();
        assert_eq!(shipped.switch().unwrap(), defaults.switch().unwrap());
        assert_eq!(shipped.stale_replica_keep, defaults.stale_replica_keep);
        assert_eq!(shipped.rebuild_rate, defaults.rebuild_rate);
        assert_eq!(shipped.extent_size, defaults.extent_size);
    }

    #[test]
    fn the_switch_takes_its_mac_table_settings_from_the_config() {
        let defaults = Config::default().switch().unwrap();
        assert_eq!(defaults, vnet::SwitchConfig::default());
        let config: Config =
            toml::from_str("mac_table_limit = 100\nmac_aging = \"90s\"\n").unwrap();
        let switch = config.switch().unwrap();
        assert_eq!(switch.mac_limit, 100);
        assert_eq!(switch.mac_aging, std::time::Duration::from_secs(90));
        for (limit, aging, key) in [
            (0, "5m", "mac_table_limit"),
            (10, "soon", "mac_aging"),
            (10, "0s", "mac_aging"),
        ] {
            let config = Config {
                mac_table_limit: limit,
                mac_aging: aging.to_owned(),
                ..Config::default()
            };
            let error = config.switch().unwrap_err();
            assert!(format!("{error:#}").contains(key), "{error:#}");
        }
    }

    #[test]
    fn bad_values_are_refused_with_the_key_named() {
        let config = Config {
            extent_size: "3M".to_owned(),
            ..Config::default()
        };
        assert!(
            config
                .extent_size_bytes()
                .unwrap_err()
                .to_string()
                .contains("power of two")
        );
        let config = Config {
            overcommit_ratio: 0.5,
            ..Config::default()
        };
        assert!(
            config
                .overcommit_milli()
                .unwrap_err()
                .to_string()
                .contains("overcommit_ratio")
        );
        let config = Config {
            metrics: "localhost".to_owned(),
            ..Config::default()
        };
        assert!(
            config
                .metrics_addr()
                .unwrap_err()
                .to_string()
                .contains("metrics address")
        );
    }
}
