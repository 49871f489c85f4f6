//! Helpers shared by the fake cluster's tests: the test image, a started cluster with a
//! kube client, and bounded waits on watch events.
#![allow(dead_code)]

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::runtime::wait::{Condition, await_condition};
use rustci_k8s_fake::{FakeCluster, FakeConfig, FakeError};

/// The test image (FROM scratch + static busybox).
pub const IMAGE: &str = rustci_runners::testkit::BUSYBOX_IMAGE;

/// Whether the environment insists on a usable Docker engine.
pub fn require() -> bool {
    std::env::var_os("RUSTCI_REQUIRE_DOCKER").is_some()
}

fn skip(why: String) -> Option<()> {
    if require() {
        panic!("RUSTCI_REQUIRE_DOCKER=1 but: {why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

/// The test image (built when missing); `None` after `SKIPPED` without an engine, unless
/// the environment demands one.
pub fn image() -> Option<&'static str> {
    rustci_runners::testkit::busybox_image_or_skip()
}

/// A kube client for the cluster's kubeconfig (context namespace `namespace`).
pub async fn client_for(kubeconfig: &str) -> kube::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::from_yaml(kubeconfig).expect("kubeconfig parses");
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .expect("kubeconfig is usable");
    kube::Client::try_from(config)
}

/// A started cluster (namespaces `default` and `ci`) and a client for it, or `None` when
/// Docker is unusable (and not required).
pub async fn cluster_with(f: impl FnOnce(&mut FakeConfig)) -> Option<(FakeCluster, kube::Client)> {
    image()?;
    let mut config = FakeConfig {
        namespaces: vec!["default".into(), "ci".into()],
        bookmark_interval: Duration::from_millis(500),
        ..FakeConfig::default()
    };
    f(&mut config);
    let cluster = match FakeCluster::start(config).await {
        Ok(c) => c,
        Err(e @ FakeError::Docker(_)) => {
            skip(e.to_string())?;
            unreachable!()
        }
        Err(e) => panic!("cannot start the fake cluster: {e}"),
    };
    let client = client_for(&cluster.kubeconfig("default"))
        .await
        .expect("client");
    Some((cluster, client))
}

/// [`cluster_with`] with the default configuration.
pub async fn cluster() -> Option<(FakeCluster, kube::Client)> {
    cluster_with(|_| {}).await
}

/// A pod of the test image running `sh -c script` once.
pub fn pod(name: &str, script: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "fake-test"}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "job",
                "image": IMAGE,
                "command": ["sh", "-c", script],
            }],
        },
    }))
    .expect("pod JSON")
}

/// Creates `pod` in `default`.
pub async fn create(client: &kube::Client, pod: &Pod) -> Pod {
    let api: Api<Pod> = Api::default_namespaced(client.clone());
    api.create(&PostParams::default(), pod)
        .await
        .expect("pod created")
}

/// Waits (through watch events, at most `secs`) until the pod satisfies `cond`.
pub async fn wait_for(
    client: &kube::Client,
    name: &str,
    secs: u64,
    cond: impl Condition<Pod>,
) -> Option<Pod> {
    let api: Api<Pod> = Api::default_namespaced(client.clone());
    tokio::time::timeout(Duration::from_secs(secs), await_condition(api, name, cond))
        .await
        .unwrap_or_else(|_| panic!("pod {name}: condition not reached within {secs}s"))
        .expect("watch works")
}

/// The pod's phase.
pub fn phase(pod: Option<&Pod>) -> Option<String> {
    pod?.status.as_ref()?.phase.clone()
}

/// Whether the pod is Succeeded or Failed.
pub fn finished(pod: Option<&Pod>) -> bool {
    matches!(phase(pod).as_deref(), Some("Succeeded" | "Failed"))
}

/// The waiting reason of the pod's first container.
pub fn waiting_reason(pod: Option<&Pod>) -> Option<String> {
    pod?.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .clone()
}

/// GET `path` raw: the body bytes (errors as kube errors). Reads the body chunk by chunk
/// (`fill_buf`/`consume`), which stays linear for large logs.
pub async fn get_bytes(client: &kube::Client, path: &str) -> kube::Result<Vec<u8>> {
    use futures::AsyncBufReadExt;
    let req = http::Request::get(path).body(Vec::new()).unwrap();
    let mut reader = Box::pin(client.request_stream(req).await?);
    let mut out = Vec::new();
    loop {
        let chunk = reader.fill_buf().await.expect("body read");
        if chunk.is_empty() {
            return Ok(out);
        }
        let n = chunk.len();
        out.extend_from_slice(chunk);
        reader.consume_unpin(n);
    }
}

/// The HTTP code and reason of a kube API error.
pub fn api_error(e: &kube::Error) -> (u16, String, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("not an API error: {other}"),
    }
}
