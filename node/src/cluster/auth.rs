//! Who may be a member: the cluster id and the cluster secret.
//!
//! Gossip is plain UDP, so it carries no secret. Instead each node publishes
//! a *proof*: an HMAC of its node id and generation under the cluster
//! secret. Peers with the same secret accept it; a node started with
//! another secret is left out of the member list (and logged), so nothing
//! is pushed to or pulled from it. Sync calls over gRPC carry a second HMAC
//! (of the cluster id) and are refused without it.
//!
//! Without a secret the cluster is open: any node that reaches the gossip
//! and API ports with the same cluster id can join. The node warns about
//! that at start.

use ring::hmac;
use tonic::{Request, Status};

/// Metadata keys of sync calls.
pub const CLUSTER_ID_HEADER: &str = "x-charon-cluster-id";
pub const CLUSTER_AUTH_HEADER: &str = "x-charon-cluster-auth";

#[derive(Clone)]
pub struct ClusterAuth {
    cluster_id: String,
    key: Option<hmac::Key>,
}

impl ClusterAuth {
    pub fn new(cluster_id: &str, secret: Option<&str>) -> ClusterAuth {
        ClusterAuth {
            cluster_id: cluster_id.to_string(),
            key: secret.map(|s| hmac::Key::new(hmac::HMAC_SHA256, s.as_bytes())),
        }
    }

    pub fn has_secret(&self) -> bool {
        self.key.is_some()
    }

    fn sign(&self, what: &str) -> String {
        match &self.key {
            Some(k) => hex::encode(hmac::sign(k, what.as_bytes()).as_ref()),
            None => String::new(),
        }
    }

    fn verify(&self, what: &str, proof: &str) -> bool {
        match &self.key {
            // Open cluster: anything goes.
            None => true,
            Some(k) => {
                let Ok(tag) = hex::decode(proof) else {
                    return false;
                };
                // Constant-time comparison inside ring.
                hmac::verify(k, what.as_bytes(), &tag).is_ok()
            }
        }
    }

    /// The gossip proof of membership of one node generation.
    pub fn member_proof(&self, node_id: &str, generation: u64) -> String {
        self.sign(&format!("member:{node_id}:{generation}"))
    }

    pub fn verify_member(&self, node_id: &str, generation: u64, proof: &str) -> bool {
        self.verify(&format!("member:{node_id}:{generation}"), proof)
    }

    /// Metadata for an outgoing sync call.
    pub fn outgoing<T>(&self, mut req: Request<T>) -> Request<T> {
        let md = req.metadata_mut();
        if let Ok(v) = self.cluster_id.parse() {
            md.insert(CLUSTER_ID_HEADER, v);
        }
        if let Ok(v) = self.sign(&format!("sync:{}", self.cluster_id)).parse() {
            md.insert(CLUSTER_AUTH_HEADER, v);
        }
        req
    }

    /// The tonic interceptor of the sync service.
    #[allow(clippy::result_large_err)]
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let md = req.metadata();
        let get = |k| md.get(k).and_then(|v| v.to_str().ok()).unwrap_or("");
        let peer = req
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let their_id = get(CLUSTER_ID_HEADER);
        if their_id != self.cluster_id {
            tracing::warn!(%peer, their_cluster_id = their_id, our_cluster_id = %self.cluster_id,
                "refused a sync call from a node of another cluster");
            return Err(Status::unauthenticated(format!(
                "cluster id mismatch: this node belongs to cluster {:?}",
                self.cluster_id
            )));
        }
        if !self.verify(
            &format!("sync:{}", self.cluster_id),
            get(CLUSTER_AUTH_HEADER),
        ) {
            tracing::warn!(%peer, "refused a sync call: wrong cluster secret");
            return Err(Status::unauthenticated("wrong cluster secret"));
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_under_the_same_secret() {
        let a = ClusterAuth::new("c", Some("s1"));
        let b = ClusterAuth::new("c", Some("s2"));
        let p = a.member_proof("n", 7);
        assert!(a.verify_member("n", 7, &p));
        assert!(!a.verify_member("n", 8, &p), "bound to the generation");
        assert!(!b.verify_member("n", 7, &p));
        assert!(!a.verify_member("n", 7, ""));
        assert!(ClusterAuth::new("c", None).verify_member("n", 7, ""));

        let call = a.outgoing(Request::new(()));
        assert!(a.check(call).is_ok());
        let call = b.outgoing(Request::new(()));
        assert_eq!(
            a.check(call).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let other = ClusterAuth::new("other", Some("s1")).outgoing(Request::new(()));
        assert_eq!(
            a.check(other).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
