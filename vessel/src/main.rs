//! `vessel`, the admin CLI: a thin gRPC client of the daemon's admin API.
//!
//! Argument parsing and rendering live here; every decision is the daemon's. Exit codes are stable so scripts can
//! branch on them (see [`exit`]).

mod client;
mod exit;
mod render;

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use vessel_proto::admin;
use vessel_proto::net::{Ipv4Subnet, MacAddress};
use vessel_proto::size::parse_size;

use crate::client::{AdminClient, Target};
use crate::exit::CliError;
use crate::render::Output;

const AFTER_HELP: &str = "\
Sizes take binary suffixes: 512M, 10G, 1T (1G = 1024^3 bytes).

Exit status: 0 success, 1 other error, 2 bad arguments, 3 not found, 4 already exists,
5 wrong state (e.g. attached, cluster not initialised), 6 out of capacity,
7 daemon unreachable or cluster unavailable.

PORT (port show/delete) is a port id, a vhost-user socket path (starts with /), or a tap name;
a path or tap name used on several nodes is ambiguous: give the id.";

/// Administer a Vessel cluster: nodes, disks, volumes, and overlay networks with their ports.
#[derive(Debug, Parser)]
#[command(name = "vessel", version, after_help = AFTER_HELP)]
struct Cli {
    /// The daemon's admin socket.
    #[arg(
        long,
        global = true,
        env = "VESSEL_ADMIN_SOCKET",
        conflicts_with = "endpoint"
    )]
    admin_socket: Option<PathBuf>,
    /// A daemon's TCP admin address (HOST:PORT), as given to `vesseld --listen`.
    #[arg(long, global = true, env = "VESSEL_ENDPOINT")]
    endpoint: Option<String>,
    /// How to print results.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    noun: Noun,
}

#[derive(Debug, Subcommand)]
enum Noun {
    /// The cluster as a whole.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// The nodes of the cluster.
    #[command(subcommand)]
    Node(NodeCmd),
    /// The disks pooled by the nodes.
    #[command(subcommand)]
    Disk(DiskCmd),
    /// Thin-provisioned volumes and their vhost-user-blk attachments.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Overlay networks: isolated L2 segments over VXLAN.
    #[command(subcommand)]
    Net(NetCmd),
    /// Ports of networks: guest NICs (vhost-user-net sockets) and tap devices.
    #[command(subcommand)]
    Port(PortCmd),
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Make the node the first member of a new cluster (says so and succeeds if already initialised).
    Init,
    /// Show the cluster's state, leader, capacity and warnings.
    Status,
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// List the nodes with their state, Raft role, address and capacity.
    List,
    /// Make this fresh node (started with --listen) join the cluster of the node at SEED_ADDR.
    Join {
        /// IP:PORT of any member's --listen address.
        #[arg(value_name = "SEED_ADDR")]
        seed: String,
    },
    /// Take a node (name or id) out of the cluster, with its disks; refused while volumes have replicas or
    /// attachments there. Send it to another node than the one removed.
    Remove {
        #[arg(value_name = "NODE")]
        node: String,
    },
    /// Move every replica off a node (name or id): it takes no new ones, and its replicas are rebuilt elsewhere
    /// and then dropped from it (`volume show` shows the progress); `node remove` works once it holds none.
    Drain {
        #[arg(value_name = "NODE")]
        node: String,
    },
}

#[derive(Debug, Subcommand)]
enum DiskCmd {
    /// Add a block device or file to the node's pool (a missing file is created with --size, sparse).
    Add {
        path: PathBuf,
        /// Size of the file to create, e.g. 100G.
        #[arg(long, value_parser = size_arg)]
        size: Option<u64>,
    },
    /// List the disks with their capacity and use.
    List,
    /// Remove a disk that holds no extents (by id, id prefix or path).
    Remove { disk: String },
}

#[derive(Debug, Subcommand)]
enum VolumeCmd {
    /// Create a thin-provisioned volume.
    Create {
        name: String,
        /// Provisioned size, e.g. 10G.
        #[arg(long, value_parser = size_arg)]
        size: u64,
        /// Logical block size in bytes (a power of two, 512 to 64K).
        #[arg(long, value_parser = size_arg)]
        block_size: Option<u64>,
        /// Number of copies of every extent.
        #[arg(long)]
        replicas: Option<u32>,
    },
    /// List the volumes.
    List,
    /// Show a volume: geometry, allocation, attachment and I/O counters.
    Show {
        volume: String,
        /// Refresh every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Grow a volume (also while attached: the guest sees the new size).
    Grow {
        volume: String,
        /// The new size, e.g. 20G.
        #[arg(long, value_parser = size_arg)]
        size: u64,
    },
    /// Delete a detached volume and free its space.
    Delete { volume: String },
    /// Serve the volume as a vhost-user-blk device on a Unix socket (the daemon listens; QEMU connects).
    Attach(AttachArgs),
    /// Stop serving the volume.
    Detach { volume: String },
}

#[derive(Debug, Args)]
struct AttachArgs {
    volume: String,
    /// Path of the vhost-user socket to create.
    #[arg(long = "vhost-user", value_name = "PATH")]
    vhost_user: PathBuf,
    /// Number of virtqueues (one worker thread each).
    #[arg(long, default_value_t = 1)]
    queues: u32,
    /// Refuse writes: the guest sees a read-only disk.
    #[arg(long)]
    read_only: bool,
    /// Mode of the socket file, in octal (world-writable modes are refused).
    #[arg(long, value_parser = octal_mode, default_value = "600")]
    socket_mode: u32,
    /// Take the volume over from the node it is attached on, if that node is gone (it is fenced off).
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Subcommand)]
enum NetCmd {
    /// Create a network.
    Create {
        name: String,
        /// VXLAN network identifier, 1 to 16777215, unique in the cluster.
        #[arg(long, value_name = "N")]
        vni: u32,
        /// IPv4 subnet in CIDR form, e.g. 10.0.0.0/24: port addresses must lie in it.
        #[arg(long, value_name = "CIDR")]
        subnet: Option<String>,
        /// Largest packet, 68 to 8950 (default 1450: a 1500-byte underlay less 50 bytes of VXLAN).
        #[arg(long, value_name = "N")]
        mtu: Option<u32>,
    },
    /// List the networks.
    List,
    /// Show a network (name or id) and its ports.
    Show { network: String },
    /// Delete a network (name or id); refused while it has ports, unless --force.
    Delete {
        network: String,
        /// Delete the network's ports too.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PortCmd {
    /// Create a port of a network on the node this command is sent to.
    Create(PortCreateArgs),
    /// List the ports.
    List {
        /// Only the ports of this network (name or id).
        #[arg(long, value_name = "NET")]
        network: Option<String>,
    },
    /// Show a port: PORT is its id, its vhost-user socket path, or its tap name.
    Show {
        #[arg(value_name = "PORT")]
        port: String,
    },
    /// Delete a port: PORT is its id, its vhost-user socket path, or its tap name.
    Delete {
        #[arg(value_name = "PORT")]
        port: String,
    },
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("kind").required(true).args(["vhost_user", "tap"])))]
struct PortCreateArgs {
    /// The network (name or id).
    #[arg(value_name = "NET")]
    network: String,
    /// A guest NIC: the vhost-user-net socket to serve (the daemon listens; QEMU connects).
    #[arg(long = "vhost-user", value_name = "PATH")]
    vhost_user: Option<PathBuf>,
    /// A tap device, created or adopted by name (at most 15 bytes).
    #[arg(long, value_name = "IFNAME")]
    tap: Option<String>,
    /// The port's MAC (default: a random locally administered one); pass the same to QEMU's `mac=`.
    #[arg(long)]
    mac: Option<String>,
    /// The port's IPv4 address (inside the network's subnet, if it has one).
    #[arg(long, value_name = "ADDR")]
    ip: Option<String>,
    /// Number of queue pairs, 1 to 16 (default 1).
    #[arg(long)]
    queues: Option<u32>,
    /// Turn port security off: the port may send from any MAC and claim any IP.
    #[arg(long)]
    allow_any_mac: bool,
    /// Mode of the vhost-user socket file, in octal (default 600; world-writable modes are refused).
    #[arg(long, value_parser = octal_mode, requires = "vhost_user")]
    socket_mode: Option<u32>,
}

fn size_arg(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|error| error.to_string())
}

fn octal_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| format!("'{text}' is not an octal file mode such as 600 or 660"))
}

fn main() {
    let cli = Cli::parse();
    let output = cli.output;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => exit::fail(&CliError::other(format!(
            "cannot start the async runtime: {error}"
        ))),
    };
    if let Err(error) = runtime.block_on(run(cli)) {
        if output == Output::Json {
            render::json_error(&error);
        }
        exit::fail(&error);
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let target = Target::from_args(cli.admin_socket, cli.endpoint);
    let mut client = AdminClient::connect(&target).await?;
    let out = cli.output;
    match cli.noun {
        Noun::Cluster(ClusterCmd::Init) => {
            let reply = client.cluster_init(admin::ClusterInitRequest {}).await?;
            render::cluster_init(out, &reply);
        }
        Noun::Cluster(ClusterCmd::Status) => render::cluster_status(
            out,
            &client
                .cluster_status(admin::ClusterStatusRequest {})
                .await?,
        ),
        Noun::Node(NodeCmd::List) => {
            render::nodes(out, &client.node_list(admin::NodeListRequest {}).await?)
        }
        Noun::Node(NodeCmd::Remove { node }) => {
            let removed = client.node_remove(admin::NodeRef { node }).await?;
            render::node_removed(out, &removed);
        }
        Noun::Node(NodeCmd::Drain { node }) => {
            let drained = client.node_drain(admin::NodeRef { node }).await?;
            render::node_draining(out, &drained);
        }
        Noun::Node(NodeCmd::Join { seed }) => {
            let reply = client.node_join(admin::NodeJoinRequest { seed }).await?;
            render::node_joined(out, &reply);
        }
        Noun::Disk(DiskCmd::Add { path, size }) => {
            let path = absolute(&path)?;
            let request = admin::DiskAddRequest {
                path,
                size_bytes: size,
            };
            render::disk_added(out, &client.disk_add(request).await?);
        }
        Noun::Disk(DiskCmd::List) => {
            render::disks(out, &client.disk_list(admin::DiskListRequest {}).await?)
        }
        Noun::Disk(DiskCmd::Remove { disk }) => {
            render::disk_removed(
                out,
                &client
                    .disk_remove(admin::DiskRemoveRequest { disk })
                    .await?,
            );
        }
        Noun::Volume(command) => volume(&mut client, out, command).await?,
        Noun::Net(command) => net(&mut client, out, command).await?,
        Noun::Port(command) => port(&mut client, out, command).await?,
    }
    Ok(())
}

async fn net(client: &mut AdminClient, out: Output, command: NetCmd) -> Result<(), CliError> {
    match command {
        NetCmd::Create {
            name,
            vni,
            subnet,
            mtu,
        } => {
            // Checked here too so a typo costs no round trip; the daemon decides.
            if let Some(subnet) = &subnet {
                subnet
                    .parse::<Ipv4Subnet>()
                    .map_err(|error| CliError::usage(format!("invalid subnet: {error}")))?;
            }
            let request = admin::NetworkCreateRequest {
                name,
                vni,
                subnet: subnet.unwrap_or_default(),
                mtu: mtu.unwrap_or(0),
            };
            render::network_created(out, &client.network_create(request).await?);
        }
        NetCmd::List => render::networks(
            out,
            &client.network_list(admin::NetworkListRequest {}).await?,
        ),
        NetCmd::Show { network } => {
            render::network(
                out,
                &client.network_show(admin::NetworkRef { network }).await?,
            );
        }
        NetCmd::Delete { network, force } => {
            let request = admin::NetworkDeleteRequest { network, force };
            render::network_deleted(out, &client.network_delete(request).await?);
        }
    }
    Ok(())
}

async fn port(client: &mut AdminClient, out: Output, command: PortCmd) -> Result<(), CliError> {
    match command {
        PortCmd::Create(args) => {
            if let Some(ip) = &args.ip {
                ip.parse::<std::net::Ipv4Addr>().map_err(|_| {
                    CliError::usage(format!(
                        "'{ip}' is not an IPv4 address; write it as a.b.c.d, e.g. 10.0.0.5"
                    ))
                })?;
            }
            if let Some(mac) = &args.mac {
                mac.parse::<MacAddress>()
                    .map_err(|error| CliError::usage(error.to_string()))?;
            }
            let request = admin::PortCreateRequest {
                network: args.network,
                vhost_user_socket: args
                    .vhost_user
                    .as_deref()
                    .map(absolute)
                    .transpose()?
                    .unwrap_or_default(),
                tap: args.tap.unwrap_or_default(),
                mac: args.mac.unwrap_or_default(),
                ip: args.ip.unwrap_or_default(),
                queues: args.queues.unwrap_or(0),
                allow_any_mac: args.allow_any_mac,
                socket_mode: args.socket_mode.unwrap_or(0),
            };
            render::port_changed(out, "created", &client.port_create(request).await?);
        }
        PortCmd::List { network } => {
            let request = admin::PortListRequest {
                network: network.unwrap_or_default(),
            };
            render::ports(out, &client.port_list(request).await?);
        }
        PortCmd::Show { port } => {
            render::port(out, &client.port_show(admin::PortRef { port }).await?)
        }
        PortCmd::Delete { port } => {
            render::port_changed(
                out,
                "deleted",
                &client.port_delete(admin::PortRef { port }).await?,
            );
        }
    }
    Ok(())
}

async fn volume(client: &mut AdminClient, out: Output, command: VolumeCmd) -> Result<(), CliError> {
    match command {
        VolumeCmd::Create {
            name,
            size,
            block_size,
            replicas,
        } => {
            let block_size = match block_size {
                None => 0,
                Some(bytes) => u32::try_from(bytes).map_err(|_| {
                    CliError::usage(format!("block size {bytes} is too large (at most 64K)"))
                })?,
            };
            let request = admin::VolumeCreateRequest {
                name,
                size_bytes: size,
                block_size,
                replicas: replicas.unwrap_or(0),
            };
            render::volume_changed(out, "created", &client.volume_create(request).await?);
        }
        VolumeCmd::List => {
            render::volumes(out, &client.volume_list(admin::VolumeListRequest {}).await?)
        }
        VolumeCmd::Show { volume, watch } => {
            let reference = admin::VolumeRef { volume };
            if !watch {
                render::volume(out, &client.volume_show(reference).await?);
                return Ok(());
            }
            loop {
                let shown = client.volume_show(reference.clone()).await?;
                if out == Output::Table {
                    // Clear the screen and home the cursor, like watch(1).
                    print!("\x1b[2J\x1b[H");
                }
                render::volume(out, &shown);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        VolumeCmd::Grow { volume, size } => {
            let request = admin::VolumeGrowRequest {
                volume,
                size_bytes: size,
            };
            render::volume_changed(out, "grown", &client.volume_grow(request).await?);
        }
        VolumeCmd::Delete { volume } => {
            render::volume_deleted(
                out,
                &client.volume_delete(admin::VolumeRef { volume }).await?,
            );
        }
        VolumeCmd::Attach(args) => {
            let request = admin::VolumeAttachRequest {
                volume: args.volume,
                vhost_user_socket: absolute(&args.vhost_user)?,
                queues: args.queues,
                read_only: args.read_only,
                socket_mode: args.socket_mode,
                force: args.force,
            };
            render::volume_changed(out, "attached", &client.volume_attach(request).await?);
        }
        VolumeCmd::Detach { volume } => {
            render::volume_changed(
                out,
                "detached",
                &client.volume_detach(admin::VolumeRef { volume }).await?,
            );
        }
    }
    Ok(())
}

/// Paths are resolved here: the daemon's working directory is not the user's.
fn absolute(path: &std::path::Path) -> Result<String, CliError> {
    let absolute = std::path::absolute(path).map_err(|error| {
        CliError::usage(format!("cannot resolve path '{}': {error}", path.display()))
    })?;
    absolute.into_os_string().into_string().map_err(|path| {
        CliError::usage(format!(
            "path '{}' is not valid UTF-8",
            path.to_string_lossy()
        ))
    })
}
