//! A multi-node cluster in network namespaces, for tests: a thin handle on `deploy/netns-cluster` (the same script
//! operators use), so what the tests exercise is what the deploy script stands up. Needs root.
//!
//! Node `i` (1-based) runs in namespace `vsl-NAME-i` at 10.99.0.i:9600; [`NetnsCluster::vessel`] talks to it over its
//! admin socket. Dropping the handle kills the daemons and deletes the namespaces, also when the test failed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, bail};

use crate::daemon::{binary, test_dir};

#[derive(Debug)]
pub struct NetnsCluster {
    name: String,
    dir: PathBuf,
    bin: PathBuf,
    nodes: usize,
}

impl NetnsCluster {
    /// Stands up `nodes` nodes named after `name` (unique per test: it names the namespaces): started, joined, and
    /// each with a 1 GiB file disk.
    pub fn up(name: &str, nodes: usize) -> anyhow::Result<NetnsCluster> {
        Self::up_with(name, nodes, &[])
    }

    /// [`NetnsCluster::up`] with more `deploy/netns-cluster up` options (e.g. `--disk-size 4G`).
    pub fn up_with(name: &str, nodes: usize, options: &[&str]) -> anyhow::Result<NetnsCluster> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("multi-node tests need root (network namespaces); CI runs them as root");
        }
        let bin = binary("vesseld")?
            .parent()
            .context("binary directory")?
            .to_path_buf();
        let cluster = NetnsCluster {
            name: name.to_owned(),
            dir: test_dir(&format!("netns-{name}"))?,
            bin,
            nodes,
        };
        let nodes = nodes.to_string();
        cluster.script(
            "up",
            None,
            &[&["--nodes", nodes.as_str()], options].concat(),
        )?;
        Ok(cluster)
    }

    fn script_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/netns-cluster")
    }

    fn script(&self, command: &str, node: Option<usize>, extra: &[&str]) -> anyhow::Result<String> {
        let mut run = Command::new(Self::script_path());
        run.arg(command);
        if let Some(node) = node {
            run.arg(node.to_string());
        }
        run.arg("--name")
            .arg(&self.name)
            .arg("--dir")
            .arg(&self.dir)
            .arg("--bin")
            .arg(&self.bin)
            .args(extra);
        let output = run.output().context("running deploy/netns-cluster")?;
        if !output.status.success() {
            bail!(
                "deploy/netns-cluster {command} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// The cluster's directory (node data under `nN/`); a test may put its own files here, e.g. sockets.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Node `i`'s listen address.
    pub fn addr(&self, node: usize) -> String {
        format!("10.99.0.{node}:9600")
    }

    /// Node `i`'s network namespace (to run a program there: `ip netns exec NAME ...`).
    pub fn namespace(&self, node: usize) -> String {
        format!("vsl-{}-{node}", self.name)
    }

    /// Node `i`'s daemon log.
    pub fn log(&self, node: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("n{node}/vesseld.log"))).unwrap_or_default()
    }

    /// Runs the CLI against node `i`.
    pub fn vessel(&self, node: usize, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(self.bin.join("vessel"))
            .arg("--admin-socket")
            .arg(self.dir.join(format!("n{node}/data/admin.sock")))
            .args(args)
            .output()
            .context("running vessel")
    }

    /// Runs the CLI against node `i`; fails unless it succeeds.
    pub fn vessel_ok(&self, node: usize, args: &[&str]) -> anyhow::Result<String> {
        let output = self.vessel(node, args)?;
        if !output.status.success() {
            bail!(
                "vessel {} on node {node} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs a read command with `--output json` against node `i`.
    pub fn vessel_json(&self, node: usize, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let text = self.vessel_ok(node, &[args, &["--output", "json"]].concat())?;
        serde_json::from_str(&text).context("vessel printed no JSON")
    }

    /// Node number (1-based) of the Raft leader as node `asked` sees it, if it knows one.
    pub fn leader(&self, asked: usize) -> Option<usize> {
        let list = self.vessel_json(asked, &["node", "list"]).ok()?;
        let leader = list["nodes"]
            .as_array()?
            .iter()
            .find(|node| node["leader"] == true)?;
        leader["name"].as_str()?.strip_prefix('n')?.parse().ok()
    }

    /// Takes node `i`'s link down: it can reach no peer and no peer reaches it.
    pub fn cut(&self, node: usize) -> anyhow::Result<()> {
        self.script("cut", Some(node), &[]).map(drop)
    }

    /// Brings node `i`'s link back.
    pub fn heal(&self, node: usize) -> anyhow::Result<()> {
        self.script("heal", Some(node), &[]).map(drop)
    }

    /// SIGKILLs node `i`'s daemon.
    pub fn kill(&self, node: usize) -> anyhow::Result<()> {
        self.script("kill", Some(node), &[]).map(drop)
    }

    /// Starts node `i`'s daemon again (same data directory) and waits until it answers.
    pub fn start(&self, node: usize) -> anyhow::Result<()> {
        self.script("start", Some(node), &[]).map(drop)
    }
}

impl Drop for NetnsCluster {
    fn drop(&mut self) {
        if let Err(error) = self.script("down", None, &[]) {
            eprintln!("{error}");
        }
    }
}
