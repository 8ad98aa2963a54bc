//! Generated protocol buffer types of Charon.
//!
//! - [`v1`]: the public gRPC management API (`charon.v1`), used by
//!   `charonctl` and any other client.
//! - [`cluster`]: node-to-node replication (`charon.cluster.v1`), internal.
//! - [`store`]: the on-disk record encoding of the node's redb store, kept
//!   apart from the API so each can evolve on its own.

pub mod v1 {
    tonic::include_proto!("charon.v1");
}

pub mod store {
    tonic::include_proto!("charon.store.v1");
}

pub mod cluster {
    tonic::include_proto!("charon.cluster.v1");
}
