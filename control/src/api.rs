//! The admin API's gRPC face: each call hands its message to the node's operation and maps the refusal to a status
//! whose message the CLI prints as is.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use vessel_proto::admin;
use vessel_proto::admin::admin_server::{Admin, AdminServer};

use crate::node::{ErrorKind, LocalNode, OpError};

/// The admin service of `node`, ready to mount on a tonic server.
pub fn admin_service(node: Arc<LocalNode>) -> AdminServer<AdminApi> {
    AdminServer::new(AdminApi { node })
}

#[derive(Debug, Clone)]
pub struct AdminApi {
    node: Arc<LocalNode>,
}

fn status(error: OpError) -> Status {
    let code = match error.kind {
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
        ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
        ErrorKind::Unavailable => tonic::Code::Unavailable,
        ErrorKind::Internal => tonic::Code::Internal,
    };
    Status::new(code, error.message)
}

fn reply<T>(result: Result<T, OpError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(status)
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn cluster_init(
        &self,
        _: Request<admin::ClusterInitRequest>,
    ) -> Result<Response<admin::ClusterInitReply>, Status> {
        reply(self.node.cluster_init().await)
    }

    async fn cluster_status(
        &self,
        _: Request<admin::ClusterStatusRequest>,
    ) -> Result<Response<admin::ClusterStatusReply>, Status> {
        Ok(Response::new(self.node.cluster_status()))
    }

    async fn node_list(
        &self,
        _: Request<admin::NodeListRequest>,
    ) -> Result<Response<admin::NodeListReply>, Status> {
        Ok(Response::new(self.node.node_list().await))
    }

    async fn node_join(
        &self,
        request: Request<admin::NodeJoinRequest>,
    ) -> Result<Response<admin::NodeJoinReply>, Status> {
        reply(self.node.node_join(request.into_inner()).await)
    }

    async fn node_remove(
        &self,
        request: Request<admin::NodeRef>,
    ) -> Result<Response<admin::Node>, Status> {
        reply(self.node.node_remove(request.get_ref()).await)
    }

    async fn node_drain(
        &self,
        request: Request<admin::NodeRef>,
    ) -> Result<Response<admin::Node>, Status> {
        reply(self.node.node_drain(request.get_ref()).await)
    }

    async fn disk_add(
        &self,
        request: Request<admin::DiskAddRequest>,
    ) -> Result<Response<admin::Disk>, Status> {
        reply(self.node.disk_add(request.into_inner()).await)
    }

    async fn disk_list(
        &self,
        _: Request<admin::DiskListRequest>,
    ) -> Result<Response<admin::DiskListReply>, Status> {
        Ok(Response::new(self.node.disk_list().await))
    }

    async fn disk_remove(
        &self,
        request: Request<admin::DiskRemoveRequest>,
    ) -> Result<Response<admin::Disk>, Status> {
        reply(self.node.disk_remove(request.into_inner()).await)
    }

    async fn volume_create(
        &self,
        request: Request<admin::VolumeCreateRequest>,
    ) -> Result<Response<admin::Volume>, Status> {
        reply(self.node.volume_create(request.into_inner()).await)
    }

    async fn volume_list(
        &self,
        _: Request<admin::VolumeListRequest>,
    ) -> Result<Response<admin::VolumeListReply>, Status> {
        Ok(Response::new(self.node.volume_list()))
    }

    async fn volume_show(
        &self,
        request: Request<admin::VolumeRef>,
    ) -> Result<Response<admin::Volume>, Status> {
        reply(self.node.volume_show(request.get_ref()))
    }

    async fn volume_grow(
        &self,
        request: Request<admin::VolumeGrowRequest>,
    ) -> Result<Response<admin::Volume>, Status> {
        reply(self.node.volume_grow(request.into_inner()).await)
    }

    async fn volume_delete(
        &self,
        request: Request<admin::VolumeRef>,
    ) -> Result<Response<admin::VolumeDeleteReply>, Status> {
        reply(self.node.volume_delete(request.get_ref()).await)
    }

    async fn volume_attach(
        &self,
        request: Request<admin::VolumeAttachRequest>,
    ) -> Result<Response<admin::Volume>, Status> {
        reply(self.node.volume_attach(request.into_inner()).await)
    }

    async fn volume_detach(
        &self,
        request: Request<admin::VolumeRef>,
    ) -> Result<Response<admin::Volume>, Status> {
        reply(self.node.volume_detach(request.get_ref()).await)
    }

    async fn network_create(
        &self,
        request: Request<admin::NetworkCreateRequest>,
    ) -> Result<Response<admin::Network>, Status> {
        reply(self.node.network_create(request.into_inner()).await)
    }

    async fn network_list(
        &self,
        _: Request<admin::NetworkListRequest>,
    ) -> Result<Response<admin::NetworkListReply>, Status> {
        Ok(Response::new(self.node.network_list()))
    }

    async fn network_show(
        &self,
        request: Request<admin::NetworkRef>,
    ) -> Result<Response<admin::Network>, Status> {
        reply(self.node.network_show(request.get_ref()))
    }

    async fn network_delete(
        &self,
        request: Request<admin::NetworkDeleteRequest>,
    ) -> Result<Response<admin::NetworkDeleteReply>, Status> {
        reply(self.node.network_delete(request.get_ref()).await)
    }

    async fn port_create(
        &self,
        request: Request<admin::PortCreateRequest>,
    ) -> Result<Response<admin::Port>, Status> {
        reply(self.node.port_create(request.into_inner()).await)
    }

    async fn port_list(
        &self,
        request: Request<admin::PortListRequest>,
    ) -> Result<Response<admin::PortListReply>, Status> {
        reply(self.node.port_list(request.get_ref()).await)
    }

    async fn port_show(
        &self,
        request: Request<admin::PortRef>,
    ) -> Result<Response<admin::Port>, Status> {
        reply(self.node.port_show(request.get_ref()).await)
    }

    async fn port_delete(
        &self,
        request: Request<admin::PortRef>,
    ) -> Result<Response<admin::Port>, Status> {
        reply(self.node.port_delete(request.get_ref()).await)
    }
}
