//! Feeding live utilisation into the cost matrix: an appliance measures the links
//! it has interfaces on (XDP rx + TC egress tx byte counters, see
//! [`crate::classify::link_rate`]), publishes them at `GET /links`, and polls the
//! other appliances' `/links` for the links it cannot see. Both kinds of sample go
//! through [`LiveCosts::observe`], which applies its threshold.
//!
//! Pure mapping here, [`LinksClient`] (one peer's `/links`, with this
//! appliance's token), and [`poll_peers_loop`], which polls every peer with it.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::{
    live::{LiveCostError, LiveCosts},
    paths::{Graph, LinkId},
};

/// One link's utilisation as measured by the appliance at end `a`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkUtilization {
    /// The measuring node.
    pub a: String,
    /// The node at the other end.
    pub b: String,
    /// max(rx, tx) / capacity.
    pub utilization: f64,
    pub rx_bps: f64,
    pub tx_bps: f64,
}

/// The topology link between `a` and `b`, if there is one.
pub fn link_of(graph: &Graph, a: &str, b: &str) -> Option<LinkId> {
    graph.link_between(graph.node_id(a)?, graph.node_id(b)?)
}

/// Turn reports into `(link, utilisation)` samples; reports naming links that
/// are not in the topology are returned separately (a misconfigured peer).
pub fn samples(graph: &Graph, reports: &[LinkUtilization]) -> (Vec<(LinkId, f64)>, Vec<String>) {
    let mut ok = Vec::new();
    let mut unknown = Vec::new();
    for r in reports {
        match link_of(graph, &r.a, &r.b) {
            Some(l) if r.utilization.is_finite() => ok.push((l, r.utilization.max(0.0))),
            _ => unknown.push(format!("{} - {}", r.a, r.b)),
        }
    }
    (ok, unknown)
}

/// Apply reports to the live costs; returns the links whose weight changed.
pub fn apply(
    live: &mut LiveCosts,
    reports: &[LinkUtilization],
) -> Result<(Vec<LinkId>, Vec<String>), LiveCostError> {
    let (s, unknown) = samples(live.graph(), reports);
    Ok((live.observe(&s)?, unknown))
}

/// Cost from every node to `target` under the weights in force (`None`:
/// unreachable), by node name.
pub fn costs_to(live: &mut LiveCosts, target: &str) -> Option<BTreeMap<String, Option<f64>>> {
    let t = live.graph().node_id(target)?;
    // Links are bidirectional with one weight, so costs from the target are costs to it.
    let (graph, paths) = live.graph_and_paths(t);
    Some(
        (0..graph.node_count() as u32)
            .map(|n| (graph.name(n).to_string(), paths.cost(n)))
            .collect(),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("[cost] peer_token_file: {0}")]
    Token(#[from] crate::api::auth::TokenError),
    #[error(
        "{peer} refused our token (HTTP {status}): it must be in the peer's [api] read_token_file"
    )]
    Refused { peer: String, status: u16 },
    #[error("{peer}: {message}")]
    Unavailable { peer: String, message: String },
}

/// Fetches other appliances' `GET /links` (and, for the manager's network
/// view, `GET /api/v1/appliance`) with this appliance's read token.
/// Blocking (run it with `spawn_blocking`); one agent, so connections are reused
/// across polls. The token file is read at every fetch, so a rotated token is
/// used from the next poll on.
#[derive(Clone, Debug)]
pub struct LinksClient {
    agent: ureq::Agent,
    token_file: PathBuf,
}

impl LinksClient {
    pub fn new(token_file: PathBuf, timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Self { agent, token_file }
    }

    /// `peer`'s links (`host:port` of its API).
    pub fn fetch(&self, peer: &str) -> Result<Vec<LinkUtilization>, FeedError> {
        self.get_json(peer, "/links")
    }

    /// `GET path` of `peer`'s API (`host:port`) with this appliance's read
    /// token, as JSON.
    pub fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        peer: &str,
        path: &str,
    ) -> Result<T, FeedError> {
        let token = crate::api::auth::read_client_token(&self.token_file)?;
        let unavailable = |message: String| FeedError::Unavailable {
            peer: format!("{peer}{path}"),
            message,
        };
        let resp = self
            .agent
            .get(&format!("http://{peer}{path}"))
            .header("Authorization", &format!("Bearer {token}"))
            .call()
            .map_err(|e| unavailable(e.to_string()))?;
        match resp.status().as_u16() {
            200 => {}
            status @ (401 | 403) => {
                return Err(FeedError::Refused {
                    peer: peer.to_string(),
                    status,
                })
            }
            status => return Err(unavailable(format!("HTTP {status}"))),
        }
        let body = resp
            .into_body()
            .read_to_string()
            .map_err(|e| unavailable(e.to_string()))?;
        serde_json::from_str(&body).map_err(|e| unavailable(format!("reply: {e}")))
    }
}

/// Learn the utilisation of links this appliance cannot see: every `interval`,
/// fetch each of `peers`' `/links` and hand the reports to `apply` (the live
/// costs). `client` is built once and kept (its agent reuses connections); its
/// calls block, so each runs on the blocking pool, off the async workers.
pub async fn poll_peers_loop<A>(
    client: LinksClient,
    peers: Vec<String>,
    interval: Duration,
    apply: A,
) where
    A: Fn(&[LinkUtilization]) + Send + Sync,
{
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        for peer in &peers {
            let (client, p) = (client.clone(), peer.clone());
            match tokio::task::spawn_blocking(move || client.fetch(&p)).await {
                Ok(Ok(reports)) => apply(&reports),
                Ok(Err(e @ (FeedError::Refused { .. } | FeedError::Token(_)))) => {
                    warn!(%peer, cause = %e, "peer /links not polled: token refused or unreadable");
                }
                Ok(Err(e)) => debug!(%peer, cause = %e, "peer /links unavailable"),
                Err(e) => warn!(cause = %e, "peer poll task"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{live::LiveCostConfig, Topology};

    fn live() -> LiveCosts {
        let t = Topology::parse(
            r#"
[[node]]
name = "lib"
role = "library"
[[node]]
name = "rack"
role = "appliance"
[[node]]
name = "hv"
role = "hypervisor"
[[link]]
a = "lib"
b = "rack"
[[link]]
a = "rack"
b = "hv"
capacity_mbps = 100
"#,
        )
        .unwrap();
        LiveCosts::new(Graph::from_topology(&t), LiveCostConfig::default()).unwrap()
    }

    fn report(a: &str, b: &str, u: f64) -> LinkUtilization {
        LinkUtilization {
            a: a.into(),
            b: b.into(),
            utilization: u,
            rx_bps: 0.0,
            tx_bps: 0.0,
        }
    }

    #[test]
    fn reports_raise_the_cost_of_the_loaded_link_only() {
        let mut l = live();
        assert_eq!(costs_to(&mut l, "lib").unwrap()["hv"], Some(2.0));
        // Either end may report, in either orientation.
        let (changed, unknown) = apply(&mut l, &[report("hv", "rack", 0.5)]).unwrap();
        assert_eq!(changed.len(), 1);
        assert!(unknown.is_empty());
        let c = costs_to(&mut l, "lib").unwrap();
        // 1 + (1 + 0.5 / 0.5) with the default gain 1.
        assert_eq!(c["hv"], Some(3.0));
        assert_eq!(c["rack"], Some(1.0));
        // Below the threshold: no change.
        let (changed, _) = apply(&mut l, &[report("rack", "hv", 0.52)]).unwrap();
        assert!(changed.is_empty());
    }

    #[test]
    fn unknown_links_and_bad_values_are_reported_not_applied() {
        let mut l = live();
        let (changed, unknown) = apply(
            &mut l,
            &[
                report("lib", "hv", 0.9),
                report("x", "y", 0.1),
                report("rack", "hv", f64::NAN),
            ],
        )
        .unwrap();
        assert!(changed.is_empty());
        assert_eq!(unknown.len(), 3);
        assert!(costs_to(&mut l, "nowhere").is_none());
    }

    /// A peer's API (the real auth layout) serving one link report.
    async fn peer_api(dir: &std::path::Path, read_token: &str) -> String {
        use crate::api::auth::{layout, ApiAuth};
        use axum::{routing::get, Json, Router};
        use std::os::unix::fs::PermissionsExt;
        let file = dir.join("peer-read.token");
        std::fs::write(&file, format!("{read_token}\n")).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let auth = std::sync::Arc::new(ApiAuth::load(Some(&file), None).unwrap());
        let links = Router::new().route(
            "/links",
            get(|| async { Json(vec![report("rack", "hv", 0.5)]) }),
        );
        let router = layout(auth, Router::new(), links, Router::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        addr.to_string()
    }

    #[tokio::test]
    async fn links_client_presents_its_token() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let token = "ab".repeat(32);
        let peer = peer_api(dir.path(), &token).await;
        let ours = dir.path().join("ours.token");
        let fetch = |contents: String| {
            std::fs::write(&ours, contents).unwrap();
            std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o600)).unwrap();
            let (client, peer) = (
                LinksClient::new(ours.clone(), Duration::from_secs(5)),
                peer.clone(),
            );
            tokio::task::spawn_blocking(move || client.fetch(&peer))
        };
        let got = fetch(format!("{token}\n")).await.unwrap().unwrap();
        assert_eq!(got, [report("rack", "hv", 0.5)]);
        let e = fetch(format!("{}\n", "cd".repeat(32)))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, FeedError::Refused { status: 401, .. }), "{e}");
        let e = fetch("short\n".into()).await.unwrap().unwrap_err();
        assert!(matches!(e, FeedError::Token(_)), "{e}");
    }
}
