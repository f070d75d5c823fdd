//! The connection to a daemon's admin API, over its Unix socket or a TCP endpoint.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use vessel_proto::admin;
use vessel_proto::admin::admin_client;

use crate::exit::CliError;

/// Where the daemon's admin API is.
#[derive(Debug, Clone)]
pub enum Target {
    Socket(PathBuf),
    Tcp(String),
}

/// The socket of a daemon started with no arguments in the current directory.
const DEFAULT_SOCKET: &str = "vessel-data/admin.sock";

impl Target {
    pub fn from_args(socket: Option<PathBuf>, endpoint: Option<String>) -> Self {
        match (socket, endpoint) {
            (Some(socket), _) => Target::Socket(socket),
            (None, Some(endpoint)) => Target::Tcp(endpoint),
            (None, None) => Target::Socket(PathBuf::from(DEFAULT_SOCKET)),
        }
    }

    fn describe(&self) -> String {
        match self {
            Target::Socket(path) => format!("admin socket {}", path.display()),
            Target::Tcp(address) => format!("endpoint {address}"),
        }
    }
}

/// A connected admin client; every call maps a gRPC status to a [`CliError`] with the daemon's message.
#[derive(Debug)]
pub struct AdminClient {
    inner: admin_client::AdminClient<Channel>,
    target: Target,
}

macro_rules! calls {
    ($($name:ident($request:ty) -> $reply:ty;)*) => {
        $(
            pub async fn $name(&mut self, request: $request) -> Result<$reply, CliError> {
                match self.inner.$name(request).await {
                    Ok(reply) => Ok(reply.into_inner()),
                    Err(status) => Err(CliError::from_status(&status, &self.target.describe())),
                }
            }
        )*
    };
}

impl AdminClient {
    pub async fn connect(target: &Target) -> Result<Self, CliError> {
        let unreachable = |error: &dyn std::fmt::Display| {
            let hint = match target {
                Target::Socket(_) => {
                    "is vesseld running? Start it with `vesseld`, or point --admin-socket (VESSEL_ADMIN_SOCKET) at its socket"
                }
                Target::Tcp(_) => {
                    "is vesseld running with --listen on that address? Check --endpoint (VESSEL_ENDPOINT)"
                }
            };
            CliError::unreachable(format!(
                "cannot reach the Vessel daemon at {}: {error}; {hint}",
                target.describe()
            ))
        };
        let channel = match target {
            Target::Socket(path) => {
                if !path.exists() {
                    return Err(unreachable(&"no such socket"));
                }
                let path = path.clone();
                // The URI is a placeholder: the connector ignores it and dials the socket.
                Endpoint::from_static("http://admin.sock")
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            tokio::net::UnixStream::connect(path)
                                .await
                                .map(TokioIo::new)
                        }
                    }))
                    .await
                    .map_err(|error| unreachable(&source_chain(&error)))?
            }
            Target::Tcp(address) => Endpoint::from_shared(format!("http://{address}"))
                .map_err(|error| {
                    CliError::usage(format!("'{address}' is not a HOST:PORT endpoint: {error}"))
                })?
                .connect()
                .await
                .map_err(|error| unreachable(&source_chain(&error)))?,
        };
        Ok(AdminClient {
            inner: admin_client::AdminClient::new(channel),
            target: target.clone(),
        })
    }

    calls! {
        volume_create(admin::VolumeCreateRequest) -> admin::Volume;
        volume_show(admin::VolumeRef) -> admin::Volume;
        volume_grow(admin::VolumeGrowRequest) -> admin::Volume;
        volume_delete(admin::VolumeRef) -> admin::VolumeDeleteReply;
        volume_attach(admin::VolumeAttachRequest) -> admin::Volume;
        volume_detach(admin::VolumeRef) -> admin::Volume;
        disk_add(admin::DiskAddRequest) -> admin::Disk;
        disk_remove(admin::DiskRemoveRequest) -> admin::Disk;
        disk_list(admin::DiskListRequest) -> admin::DiskListReply;
        volume_list(admin::VolumeListRequest) -> admin::VolumeListReply;
        node_list(admin::NodeListRequest) -> admin::NodeListReply;
        node_join(admin::NodeJoinRequest) -> admin::NodeJoinReply;
        node_remove(admin::NodeRef) -> admin::Node;
        node_drain(admin::NodeRef) -> admin::Node;
        cluster_init(admin::ClusterInitRequest) -> admin::ClusterInitReply;
        cluster_status(admin::ClusterStatusRequest) -> admin::ClusterStatusReply;
        network_create(admin::NetworkCreateRequest) -> admin::Network;
        network_list(admin::NetworkListRequest) -> admin::NetworkListReply;
        network_show(admin::NetworkRef) -> admin::Network;
        network_delete(admin::NetworkDeleteRequest) -> admin::NetworkDeleteReply;
        port_create(admin::PortCreateRequest) -> admin::Port;
        port_list(admin::PortListRequest) -> admin::PortListReply;
        port_show(admin::PortRef) -> admin::Port;
        port_delete(admin::PortRef) -> admin::Port;
    }
}

/// tonic's transport errors say "transport error"; the cause is in the source chain.
fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
