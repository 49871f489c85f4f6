//! The HTTP side: accepting (TLS) connections, authentication, request recording, failure
//! injection and the core/v1 routes with real Kubernetes JSON.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use base64::Engine;
use bytes::Bytes;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::core::v1::{
    Namespace, NamespaceSpec, NamespaceStatus, Node, NodeAddress, NodeCondition, NodeSpec,
    NodeStatus, NodeSystemInfo, Pod, Secret,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    DeleteOptions, ListMeta, ObjectMeta, Status, StatusDetails, Time,
};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::kubelet::{PodCmd, now, retry_namespace};
use crate::logs::{self, ReadOptions};
use crate::selector::{FieldSelector, Fields, LabelSelector};
use crate::status::ApiError;
use crate::store::{Event, EventType, Kind};
use crate::{RequestRecord, Shared, random_hex, validate};

/// Accepts connections until shutdown; each connection is served by hyper's HTTP/1 server
/// (behind rustls when TLS is on).
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
) {
    let router = axum::Router::new()
        .fallback(handle)
        .with_state(shared.clone());
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            _ = until_true(&mut shutdown) => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let acceptor = acceptor.clone();
        let mut shutdown = shared.shutdown.subscribe();
        shared.spawn(async move {
            let service = TowerToHyperService::new(router);
            let connection = async move {
                match acceptor {
                    Some(acceptor) => {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    }
                    None => {
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), service)
                            .await;
                    }
                }
            };
            tokio::select! {
                _ = connection => {}
                _ = until_true(&mut shutdown) => {}
            }
        });
    }
}

/// Resolves once the flag is true (without holding the channel's guard).
async fn until_true(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

fn json_response(code: u16, value: &impl Serialize) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: ApiError) -> Response {
    json_response(e.code, &e.status())
}

type Answer = Result<Response, ApiError>;

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let response = dispatch(&shared, req).await.unwrap_or_else(error_response);
    shared
        .requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(RequestRecord {
            method,
            path,
            query,
            status: response.status().as_u16(),
        });
    response
}

/// Query parameters.
struct Query(Vec<(String, String)>);

impl Query {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some("true" | "1" | "True"))
    }

    fn number(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None | Some("") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                ApiError::bad_request(format!("invalid value {v:?} for query parameter {name}"))
            }),
        }
    }
}

/// The routes served.
enum Route {
    Version,
    Health,
    Api,
    Apis,
    ApiV1,
    Namespaces,
    Namespace(String),
    Nodes,
    Node(String),
    /// `(namespace or all, kind)`
    Collection(Option<String>, Kind),
    /// `(namespace, kind, name)`
    Object(String, Kind, String),
    Log(String, String),
}

fn route(path: &str) -> Option<Route> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let kind = |s: &str| match s {
        "pods" => Some(Kind::Pod),
        "secrets" => Some(Kind::Secret),
        _ => None,
    };
    Some(match parts.as_slice() {
        ["version"] => Route::Version,
        ["healthz" | "readyz" | "livez"] => Route::Health,
        ["api"] => Route::Api,
        ["apis"] => Route::Apis,
        ["api", "v1"] => Route::ApiV1,
        ["api", "v1", "namespaces"] => Route::Namespaces,
        ["api", "v1", "namespaces", ns] => Route::Namespace(ns.to_string()),
        ["api", "v1", "nodes"] => Route::Nodes,
        ["api", "v1", "nodes", name] => Route::Node(name.to_string()),
        ["api", "v1", res] => Route::Collection(None, kind(res)?),
        ["api", "v1", "namespaces", ns, res] => Route::Collection(Some(ns.to_string()), kind(res)?),
        ["api", "v1", "namespaces", ns, res, name] => {
            Route::Object(ns.to_string(), kind(res)?, name.to_string())
        }
        ["api", "v1", "namespaces", ns, "pods", name, "log"] => {
            Route::Log(ns.to_string(), name.to_string())
        }
        _ => return None,
    })
}

/// `(verb, resource, name, namespace)` for RBAC checks.
fn authz(
    method: &str,
    route: &Route,
    watch: bool,
) -> Option<(&'static str, String, String, String)> {
    let list_verb = if watch { "watch" } else { "list" };
    let verb_one = |m: &str| match m {
        "GET" => "get",
        "DELETE" => "delete",
        "PUT" => "update",
        "PATCH" => "patch",
        _ => "create",
    };
    Some(match route {
        Route::Namespaces => (list_verb, "namespaces".into(), String::new(), String::new()),
        Route::Namespace(n) => (
            verb_one(method),
            "namespaces".into(),
            n.clone(),
            String::new(),
        ),
        Route::Nodes => (list_verb, "nodes".into(), String::new(), String::new()),
        Route::Node(n) => (verb_one(method), "nodes".into(), n.clone(), String::new()),
        Route::Collection(ns, kind) => {
            let verb = if method == "POST" {
                "create"
            } else {
                list_verb
            };
            (
                verb,
                kind.plural().into(),
                String::new(),
                ns.clone().unwrap_or_default(),
            )
        }
        Route::Object(ns, kind, name) => {
            let verb = if watch { "watch" } else { verb_one(method) };
            (verb, kind.plural().into(), name.clone(), ns.clone())
        }
        Route::Log(ns, name) => ("get", "pods/log".into(), name.clone(), ns.clone()),
        _ => return None,
    })
}

async fn dispatch(shared: &Arc<Shared>, req: Request) -> Answer {
    let expected = format!("Bearer {}", shared.config.token);
    let authorized = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == expected);
    if !authorized {
        return Err(ApiError::unauthorized());
    }
    let method = req.method().as_str().to_ascii_uppercase();
    let path = req.uri().path().to_string();
    let query = Query(
        axum::extract::Query::<Vec<(String, String)>>::try_from_uri(req.uri())
            .map(|q| q.0)
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
    );
    let route = route(&path);
    let watch = query.flag("watch");
    let who = route.as_ref().and_then(|r| authz(&method, r, watch));
    // Injected failures first.
    let injected = {
        let mut rules = shared.failures.lock().unwrap_or_else(|p| p.into_inner());
        let hit = rules.iter().position(|r| {
            r.times > 0
                && r.method
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(&method))
                && path.contains(&r.path_contains)
        });
        hit.map(|i| {
            rules[i].times -= 1;
            let status = rules[i].status;
            if rules[i].times == 0 {
                rules.remove(i);
            }
            status
        })
    };
    if let Some(code) = injected {
        let (verb, resource, name, ns) =
            who.clone()
                .unwrap_or(("get", String::new(), String::new(), String::new()));
        return Err(if code == 403 {
            ApiError::forbidden(verb, &resource, &name, &ns)
        } else {
            ApiError::injected(code, &resource, &name)
        });
    }
    if let Some((verb, resource, name, ns)) = &who {
        let forbidden = shared
            .forbidden
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(verb.to_string(), resource.clone()));
        if forbidden {
            return Err(ApiError::forbidden(verb, resource, name, ns));
        }
    }
    let Some(route) = route else {
        return Err(ApiError::no_route());
    };
    let body = axum::body::to_bytes(req.into_body(), 64 * 1024 * 1024)
        .await
        .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
    match (method.as_str(), route) {
        ("GET", Route::Version) => Ok(version()),
        ("GET", Route::Health) => {
            let mut r = Response::new(Body::from("ok"));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            Ok(r)
        }
        ("GET", Route::Api) => Ok(json_response(
            200,
            &serde_json::json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
            }),
        )),
        ("GET", Route::Apis) => Ok(json_response(
            200,
            &serde_json::json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
        )),
        ("GET", Route::ApiV1) => Ok(resource_list()),
        ("GET", Route::Namespaces) => {
            let st = shared.store.lock();
            let items: Vec<Namespace> = st.namespaces.values().cloned().collect();
            Ok(json_response(
                200,
                &k8s_openapi::List {
                    items,
                    metadata: ListMeta {
                        resource_version: Some(st.rv().to_string()),
                        ..Default::default()
                    },
                },
            ))
        }
        ("GET", Route::Namespace(name)) => {
            let st = shared.store.lock();
            match st.namespaces.get(&name) {
                Some(ns) => Ok(json_response(200, ns)),
                None => Err(ApiError::not_found("namespaces", &name)),
            }
        }
        ("GET", Route::Nodes) => {
            let node = node_object(shared);
            Ok(json_response(
                200,
                &k8s_openapi::List {
                    items: vec![node],
                    metadata: ListMeta {
                        resource_version: Some(shared.store.lock().rv().to_string()),
                        ..Default::default()
                    },
                },
            ))
        }
        ("GET", Route::Node(name)) => {
            if name == shared.config.node_name {
                Ok(json_response(200, &node_object(shared)))
            } else {
                Err(ApiError::not_found("nodes", &name))
            }
        }
        ("GET", Route::Collection(ns, kind)) => {
            // As the real API server: listing/watching a namespace that does not exist
            // is an empty result, not an error.
            if watch {
                start_watch(shared, ns, kind, &query)
            } else {
                list(shared, ns, kind, &query)
            }
        }
        ("POST", Route::Collection(Some(ns), Kind::Pod)) => create_pod(shared, &ns, &body, &query),
        ("POST", Route::Collection(Some(ns), Kind::Secret)) => {
            create_secret(shared, &ns, &body, &query)
        }
        ("GET", Route::Object(ns, kind, name)) => {
            if watch {
                let mut q = query.0.clone();
                q.push(("fieldSelector".into(), format!("metadata.name={name}")));
                return start_watch(shared, Some(ns), kind, &Query(q));
            }
            let st = shared.store.lock();
            let key = (ns, name.clone());
            match kind {
                Kind::Pod => st
                    .pods
                    .get(&key)
                    .map(|e| json_response(200, &e.pod))
                    .ok_or_else(|| ApiError::not_found("pods", &name)),
                Kind::Secret => st
                    .secrets
                    .get(&key)
                    .map(|s| json_response(200, s))
                    .ok_or_else(|| ApiError::not_found("secrets", &name)),
            }
        }
        ("DELETE", Route::Object(ns, Kind::Pod, name)) => {
            delete_pod(shared, &ns, &name, &body, &query)
        }
        ("DELETE", Route::Object(ns, Kind::Secret, name)) => {
            delete_secret(shared, &ns, &name, &query)
        }
        ("GET", Route::Log(ns, name)) => pod_log(shared, &ns, &name, &query),
        (m, _) => Err(ApiError::method_not_allowed(m)),
    }
}

fn ensure_namespace(shared: &Shared, ns: &str) -> Result<(), ApiError> {
    if shared.store.lock().namespaces.contains_key(ns) {
        Ok(())
    } else {
        Err(ApiError::not_found("namespaces", ns))
    }
}

fn version() -> Response {
    json_response(
        200,
        &serde_json::json!({
            "major": "1",
            "minor": "37",
            "emulationMajor": "1",
            "emulationMinor": "37",
            "minCompatibilityMajor": "1",
            "minCompatibilityMinor": "36",
            "gitVersion": "v1.37.0-rustci-fake",
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "go1.25.0",
            "compiler": "gc",
            "platform": format!("linux/{}", match std::env::consts::ARCH { "x86_64" => "amd64", "aarch64" => "arm64", a => a }),
        }),
    )
}

fn resource_list() -> Response {
    let res = |name: &str, kind: &str, namespaced: bool, verbs: &[&str]| {
        serde_json::json!({
            "name": name, "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": verbs,
        })
    };
    json_response(
        200,
        &serde_json::json!({
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [
                res("namespaces", "Namespace", false, &["get", "list"]),
                res("nodes", "Node", false, &["get", "list"]),
                res("pods", "Pod", true, &["create", "delete", "get", "list", "watch"]),
                res("pods/log", "Pod", true, &["get"]),
                res("secrets", "Secret", true, &["create", "delete", "get", "list", "watch"]),
            ],
        }),
    )
}

/// The API object of a namespace that exists from the start.
pub(crate) fn namespace_object(name: &str, rv: u64, cluster_id: &str) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            uid: Some(uid_from(cluster_id, rv as u32)),
            resource_version: Some(rv.to_string()),
            creation_timestamp: Some(now()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_string(),
                name.to_string(),
            )])),
            ..Default::default()
        },
        spec: Some(NamespaceSpec {
            finalizers: Some(vec!["kubernetes".into()]),
        }),
        status: Some(NamespaceStatus {
            phase: Some("Active".into()),
            ..Default::default()
        }),
    }
}

/// A uid derived from the cluster id (stable for the node and namespaces).
fn uid_from(cluster_id: &str, n: u32) -> String {
    let id: String = format!("{cluster_id:0<12}").chars().take(12).collect();
    format!("{}-{}-4000-a000-{n:012x}", &id[0..8], &id[8..12])
}

/// A random UUID-formatted uid.
fn new_uid() -> String {
    let h = random_hex(32);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn node_object(shared: &Shared) -> Node {
    let resources = BTreeMap::from([
        ("cpu".to_string(), Quantity(shared.node_cpu_text.clone())),
        (
            "memory".to_string(),
            Quantity(shared.node_memory_text.clone()),
        ),
        ("pods".to_string(), Quantity("110".into())),
        ("ephemeral-storage".to_string(), Quantity("100Gi".into())),
    ]);
    let schedulable = shared.schedulable.load(std::sync::atomic::Ordering::SeqCst);
    let condition = |kind: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: kind.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now()),
        last_transition_time: Some(now()),
    };
    Node {
        metadata: ObjectMeta {
            name: Some(shared.config.node_name.clone()),
            uid: Some(uid_from(&shared.cluster_id, 0)),
            resource_version: Some("1".into()),
            labels: Some(crate::kubelet::node_labels(shared)),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: (!shared.config.node_taints.is_empty())
                .then(|| shared.config.node_taints.clone()),
            unschedulable: (!schedulable).then_some(true),
            pod_cidr: Some("10.244.0.0/16".into()),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            capacity: Some(resources.clone()),
            allocatable: Some(resources),
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: "127.0.0.1".into(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: shared.config.node_name.clone(),
                },
            ]),
            conditions: Some(vec![
                condition(
                    "MemoryPressure",
                    "False",
                    "KubeletHasSufficientMemory",
                    "kubelet has sufficient memory available",
                ),
                condition(
                    "DiskPressure",
                    "False",
                    "KubeletHasNoDiskPressure",
                    "kubelet has no disk pressure",
                ),
                condition(
                    "PIDPressure",
                    "False",
                    "KubeletHasSufficientPID",
                    "kubelet has sufficient PID available",
                ),
                condition(
                    "Ready",
                    "True",
                    "KubeletReady",
                    "kubelet is posting ready status",
                ),
            ]),
            node_info: Some(NodeSystemInfo {
                architecture: match std::env::consts::ARCH {
                    "x86_64" => "amd64".into(),
                    "aarch64" => "arm64".into(),
                    a => a.into(),
                },
                boot_id: shared.cluster_id.clone(),
                container_runtime_version: "docker://rustci-k8s-fake".into(),
                kernel_version: String::new(),
                kube_proxy_version: String::new(),
                kubelet_version: "v1.37.0-rustci-fake".into(),
                machine_id: shared.cluster_id.clone(),
                operating_system: "linux".into(),
                os_image: "rustci-k8s-fake".into(),
                system_uuid: shared.cluster_id.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

struct Selectors {
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Selectors {
    fn parse(namespace: Option<String>, kind: Kind, query: &Query) -> Result<Self, ApiError> {
        Ok(Selectors {
            namespace,
            labels: LabelSelector::parse(query.get("labelSelector").unwrap_or(""))
                .map_err(ApiError::bad_request)?,
            fields: FieldSelector::parse(
                query.get("fieldSelector").unwrap_or(""),
                kind == Kind::Pod,
            )
            .map_err(ApiError::bad_request)?,
        })
    }

    fn matches(&self, f: &Fields) -> bool {
        self.namespace.as_ref().is_none_or(|n| *n == f.namespace)
            && self.labels.matches(&f.labels)
            && self.fields.matches(f)
    }
}

#[derive(Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: u64,
    ns: String,
    name: String,
}

fn list(shared: &Shared, ns: Option<String>, kind: Kind, query: &Query) -> Answer {
    let selectors = Selectors::parse(ns, kind, query)?;
    let limit = query
        .number("limit")?
        .filter(|l| *l > 0)
        .map(|l| l as usize);
    let start = match query.get("continue").filter(|c| !c.is_empty()) {
        None => None,
        Some(token) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(token)
                .ok()
                .and_then(|b| serde_json::from_slice::<ContinueToken>(&b).ok())
                .ok_or_else(|| {
                    ApiError::bad_request("continue key is not valid: illegal base64 data")
                })?;
            Some((decoded.ns, decoded.name))
        }
    };
    let st = shared.store.lock();
    let rv = st.rv();
    let after = |k: &(String, String)| start.as_ref().is_none_or(|s| k > s);
    let mut meta = ListMeta {
        resource_version: Some(rv.to_string()),
        ..Default::default()
    };
    macro_rules! page {
        ($iter:expr) => {{
            let mut items = Vec::new();
            let mut last = None;
            let mut more = 0i64;
            for (key, obj, fields) in $iter {
                if !after(key) || !selectors.matches(&fields) {
                    continue;
                }
                if limit.is_some_and(|l| items.len() >= l) {
                    more += 1;
                    continue;
                }
                last = Some(key.clone());
                items.push(obj.clone());
            }
            if more > 0
                && let Some((ns, name)) = last
            {
                let token = serde_json::to_vec(&ContinueToken { rv, ns, name }).unwrap_or_default();
                meta.continue_ = Some(base64::engine::general_purpose::STANDARD.encode(token));
                meta.remaining_item_count = Some(more);
            }
            items
        }};
    }
    Ok(match kind {
        Kind::Pod => {
            let items: Vec<Pod> = page!(st.pods.iter().map(|(k, e)| (
                k,
                &e.pod,
                crate::store::pod_fields(&e.pod)
            )));
            json_response(
                200,
                &k8s_openapi::List {
                    items,
                    metadata: meta,
                },
            )
        }
        Kind::Secret => {
            let items: Vec<Secret> = page!(st.secrets.iter().map(|(k, s)| (
                k,
                s,
                crate::store::secret_fields(s)
            )));
            json_response(
                200,
                &k8s_openapi::List {
                    items,
                    metadata: meta,
                },
            )
        }
    })
}

fn event_line(etype: &str, object: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(object.len() + 32);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(etype.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    Bytes::from(line)
}

fn bookmark_line(kind: Kind, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = serde_json::json!({ "resourceVersion": rv.to_string() });
    if initial_end {
        meta["annotations"] = serde_json::json!({ "k8s.io/initial-events-end": "true" });
    }
    let object = serde_json::json!({ "kind": kind.kind(), "apiVersion": "v1", "metadata": meta });
    event_line("BOOKMARK", object.to_string().as_bytes())
}

fn transform(selectors: &Selectors, e: &Event) -> Option<Bytes> {
    let now = selectors.matches(&e.cur);
    let etype = match e.etype {
        EventType::Added | EventType::Deleted => now.then_some(e.etype)?,
        EventType::Modified => {
            let before = e.prev.as_ref().is_some_and(|p| selectors.matches(p));
            match (before, now) {
                (true, true) => EventType::Modified,
                (false, true) => EventType::Added,
                (true, false) => EventType::Deleted,
                (false, false) => return None,
            }
        }
    };
    Some(event_line(etype.name(), &e.object))
}

fn streaming_body<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
    content_type: &'static str,
    into: fn(T) -> Result<Bytes, std::io::Error>,
) -> Response {
    let stream = futures::stream::unfold(rx, move |mut rx| async move {
        rx.recv().await.map(|item| (into(item), rx))
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn start_watch(shared: &Arc<Shared>, ns: Option<String>, kind: Kind, query: &Query) -> Answer {
    let selectors = Selectors::parse(ns, kind, query)?;
    let from = match query.get("resourceVersion") {
        None | Some("") | Some("0") => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {v:?}")))?,
        ),
    };
    let initial = query.flag("sendInitialEvents");
    let bookmarks = query.flag("allowWatchBookmarks");
    let timeout = query
        .number("timeoutSeconds")?
        .filter(|t| *t > 0)
        .map(|t| Duration::from_secs(t as u64));
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let start = shared.store.lock().watch(kind, from, initial);
    let mut start = match start {
        Ok(s) => s,
        Err(e) => {
            // As the API server does: 200, one ERROR event, end of stream.
            let status = serde_json::to_vec(&e.status()).unwrap_or_default();
            let _ = tx.try_send(Ok(event_line("ERROR", &status)));
            drop(tx);
            return Ok(streaming_body(rx, "application/json", |r| r));
        }
    };
    let mut dropped = shared.drop_gen.subscribe();
    dropped.mark_unchanged();
    let mut shutdown = shared.shutdown.subscribe();
    let interval = shared
        .config
        .bookmark_interval
        .max(Duration::from_millis(10));
    shared.spawn(async move {
        let mut last_rv = start.rv;
        for (fields, object) in std::mem::take(&mut start.initial) {
            if selectors.matches(&fields) && tx.send(Ok(event_line("ADDED", &object))).await.is_err() {
                return;
            }
        }
        if initial && tx.send(Ok(bookmark_line(kind, start.rv, true))).await.is_err() {
            return;
        }
        for e in std::mem::take(&mut start.backlog) {
            last_rv = last_rv.max(e.rv);
            if let Some(line) = transform(&selectors, &e)
                && tx.send(Ok(line)).await.is_err()
            {
                return;
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = start.rx.recv() => match event {
                    Ok(e) => {
                        last_rv = last_rv.max(e.rv);
                        if e.kind == kind
                            && let Some(line) = transform(&selectors, &e)
                            && tx.send(Ok(line)).await.is_err()
                        {
                            return;
                        }
                    }
                    // Too slow a reader or the store is gone: end the watch; the client
                    // resumes from the last resourceVersion it saw.
                    Err(_) => return,
                },
                _ = ticks.tick(), if bookmarks => {
                    if tx.send(Ok(bookmark_line(kind, last_rv, false))).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => return,
                _ = dropped.changed() => {
                    let _ = tx
                        .send(Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "watch dropped by the fake cluster",
                        )))
                        .await;
                    return;
                }
                _ = until_true(&mut shutdown) => return,
                _ = tx.closed() => return,
            }
        }
    });
    Ok(streaming_body(rx, "application/json", |r| r))
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8], kind: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body of the request was in an unknown format - accepted media types include: application/json; decoding {kind}: {e}"
        ))
    })
}

fn generated_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let hex = random_hex(10);
    let suffix: String = hex
        .as_bytes()
        .chunks(2)
        .map(|pair| {
            let n = u8::from_str_radix(std::str::from_utf8(pair).unwrap_or("0"), 16).unwrap_or(0);
            ALPHABET[n as usize % ALPHABET.len()] as char
        })
        .collect();
    format!("{prefix}{suffix}")
}

/// Fills the server-side metadata of a new object.
fn new_metadata(meta: &mut ObjectMeta, ns: &str) -> Result<(), ApiError> {
    if let Some(body_ns) = meta.namespace.as_deref()
        && !body_ns.is_empty()
        && body_ns != ns
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    meta.namespace = Some(ns.to_string());
    if meta.name.as_deref().unwrap_or("").is_empty()
        && let Some(prefix) = meta.generate_name.as_deref().filter(|p| !p.is_empty())
    {
        let mut prefix = prefix.to_string();
        prefix.truncate(253 - 5);
        meta.name = Some(generated_name(&prefix));
    }
    meta.uid = Some(new_uid());
    meta.creation_timestamp = Some(now());
    meta.resource_version = None;
    meta.deletion_timestamp = None;
    meta.deletion_grace_period_seconds = None;
    meta.generation = Some(1);
    meta.managed_fields = None;
    meta.self_link = None;
    Ok(())
}

fn create_pod(shared: &Arc<Shared>, ns: &str, body: &[u8], query: &Query) -> Answer {
    ensure_namespace(shared, ns)?;
    let mut pod: Pod = parse_body(body, "Pod")?;
    new_metadata(&mut pod.metadata, ns)?;
    if let Some(spec) = pod.spec.as_mut() {
        validate::default_pod_spec(spec);
    }
    let name = pod.metadata.name.clone().unwrap_or_default();
    let errors = validate::pod_errors(&pod);
    if !errors.is_empty() {
        return Err(ApiError::invalid("Pod", &name, "pods", errors));
    }
    let qos = pod
        .spec
        .as_ref()
        .map(validate::qos_class)
        .unwrap_or("BestEffort");
    pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
        phase: Some("Pending".into()),
        qos_class: Some(qos.into()),
        ..Default::default()
    });
    if query.get("dryRun") == Some("All") {
        if shared
            .store
            .lock()
            .pods
            .contains_key(&(ns.to_string(), name.clone()))
        {
            return Err(ApiError::already_exists("pods", &name));
        }
        return Ok(json_response(201, &pod));
    }
    let created = shared.store.lock().insert_pod(pod)?;
    shared.sched.notify_one();
    Ok(json_response(201, &created))
}

fn create_secret(shared: &Arc<Shared>, ns: &str, body: &[u8], query: &Query) -> Answer {
    ensure_namespace(shared, ns)?;
    let mut secret: Secret = parse_body(body, "Secret")?;
    new_metadata(&mut secret.metadata, ns)?;
    let name = secret.metadata.name.clone().unwrap_or_default();
    let errors = validate::secret_errors(&secret);
    if !errors.is_empty() {
        return Err(ApiError::invalid("Secret", &name, "secrets", errors));
    }
    if let Some(string_data) = secret.string_data.take() {
        let data = secret.data.get_or_insert_with(BTreeMap::new);
        for (k, v) in string_data {
            data.insert(k, k8s_openapi::ByteString(v.into_bytes()));
        }
    }
    secret.type_.get_or_insert_with(|| "Opaque".into());
    if query.get("dryRun") == Some("All") {
        return Ok(json_response(201, &secret));
    }
    let created = shared.store.lock().insert_secret(secret)?;
    retry_namespace(shared, ns);
    Ok(json_response(201, &created))
}

fn delete_secret(shared: &Arc<Shared>, ns: &str, name: &str, query: &Query) -> Answer {
    let key = (ns.to_string(), name.to_string());
    let removed = if query.get("dryRun") == Some("All") {
        shared.store.lock().secrets.get(&key).cloned()
    } else {
        shared.store.lock().remove_secret(&key)
    };
    let secret = removed.ok_or_else(|| ApiError::not_found("secrets", name))?;
    retry_namespace(shared, ns);
    Ok(json_response(
        200,
        &Status {
            status: Some("Success".into()),
            details: Some(StatusDetails {
                name: Some(name.to_string()),
                kind: Some("secrets".into()),
                uid: secret.metadata.uid.clone(),
                ..Default::default()
            }),
            metadata: ListMeta::default(),
            ..Default::default()
        },
    ))
}

fn delete_pod(shared: &Arc<Shared>, ns: &str, name: &str, body: &[u8], query: &Query) -> Answer {
    let options: DeleteOptions = if body.iter().all(|b| b.is_ascii_whitespace()) {
        DeleteOptions::default()
    } else {
        parse_body(body, "DeleteOptions")?
    };
    let dry_run = query.get("dryRun") == Some("All")
        || options
            .dry_run
            .as_ref()
            .is_some_and(|d| d.iter().any(|v| v == "All"));
    let requested = query
        .number("gracePeriodSeconds")?
        .or(options.grace_period_seconds);
    let key = (ns.to_string(), name.to_string());
    let mut st = shared.store.lock();
    let Some(entry) = st.pods.get(&key) else {
        return Err(ApiError::not_found("pods", name));
    };
    let pod = entry.pod.clone();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if let Some(want) = options.preconditions.as_ref().and_then(|p| p.uid.clone())
        && want != uid
    {
        return Err(ApiError::conflict(
            "pods",
            name,
            &format!("Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"),
        ));
    }
    if dry_run {
        return Ok(json_response(200, &pod));
    }
    let grace = requested
        .or(pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds))
        .unwrap_or(30)
        .max(0);
    let worker = entry.worker.clone();
    let Some(worker) = worker else {
        // Nothing runs it yet: gone at once.
        let removed = st.remove_pod(&key, &uid).map(|e| e.pod);
        drop(st);
        shared.sched.notify_one();
        return Ok(json_response(200, &removed.unwrap_or(pod)));
    };
    if grace == 0 {
        let removed = st.remove_pod(&key, &uid).map(|e| e.pod);
        drop(st);
        let _ = worker.send(PodCmd::Delete {
            grace: 0,
            removed: true,
        });
        shared.sched.notify_one();
        return Ok(json_response(200, &removed.unwrap_or(pod)));
    }
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    let deadline = now_secs + grace;
    let current = pod
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_second());
    let shorter = current.is_none_or(|c| deadline < c);
    let updated = if shorter {
        st.modify_pod(&key, &uid, |p| {
            p.metadata.deletion_timestamp = Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(deadline)
                    .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            ));
            p.metadata.deletion_grace_period_seconds = Some(grace);
        })
    } else {
        Some(pod.clone())
    };
    drop(st);
    if shorter {
        let _ = worker.send(PodCmd::Delete {
            grace: grace as u64,
            removed: false,
        });
    }
    Ok(json_response(200, &updated.unwrap_or(pod)))
}

fn pod_log(shared: &Arc<Shared>, ns: &str, name: &str, query: &Query) -> Answer {
    let (pod, uid) = {
        let st = shared.store.lock();
        let entry = st
            .pods
            .get(&(ns.to_string(), name.to_string()))
            .ok_or_else(|| ApiError::not_found("pods", name))?;
        (
            entry.pod.clone(),
            entry.pod.metadata.uid.clone().unwrap_or_default(),
        )
    };
    let spec = pod.spec.clone().unwrap_or_default();
    let names: Vec<String> = spec.containers.iter().map(|c| c.name.clone()).collect();
    let container = match query.get("container").filter(|c| !c.is_empty()) {
        Some(c) => {
            if !names.iter().any(|n| n == c) {
                return Err(ApiError::bad_request(format!(
                    "container {c} is not valid for pod {name}"
                )));
            }
            c.to_string()
        }
        None if names.len() == 1 => names[0].clone(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                names.join(" ")
            )));
        }
    };
    if query.flag("previous") {
        return Err(ApiError::bad_request(format!(
            "previous terminated container \"{container}\" in pod \"{name}\" not found"
        )));
    }
    let requested = query
        .get("stream")
        .filter(|_| shared.config.split_log_streams);
    let stream = match requested {
        None | Some("") | Some("All") => None,
        Some("Stdout") => Some(logs::Stream::Stdout),
        Some("Stderr") => Some(logs::Stream::Stderr),
        Some(other) => {
            return Err(ApiError::invalid(
                "PodLogOptions",
                "",
                "podlogoptions",
                vec![crate::status::FieldError::not_supported(
                    "stream",
                    other,
                    &["All", "Stderr", "Stdout"],
                )],
            ));
        }
    };
    let tail_lines = query.number("tailLines")?;
    let limit_bytes = query.number("limitBytes")?;
    if stream.is_some() && tail_lines.is_some() {
        return Err(ApiError::invalid(
            "PodLogOptions",
            "",
            "podlogoptions",
            vec![crate::status::FieldError::invalid(
                "tailLines",
                &tail_lines.unwrap_or_default().to_string(),
                "tailLines and specific stream are mutually exclusive for now",
            )],
        ));
    }
    let log = shared
        .logs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&(uid, container.clone()))
        .cloned();
    let Some(log) = log else {
        if spec.node_name.is_none() {
            return Err(ApiError::bad_request(format!(
                "pod {name} does not have a host assigned"
            )));
        }
        let reason = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.name == container))
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.clone())
            .unwrap_or_else(|| "ContainerCreating".into());
        let why = match reason.as_str() {
            "ErrImagePull" | "ImagePullBackOff" => "trying and failing to pull image".to_string(),
            _ => reason,
        };
        return Err(ApiError::bad_request(format!(
            "container \"{container}\" in pod \"{name}\" is waiting to start: {why}"
        )));
    };
    let options = ReadOptions {
        follow: query.flag("follow") && !log.is_done(),
        stream,
        timestamps: query.flag("timestamps"),
        tail_lines: tail_lines.map(|t| t.max(0) as u64),
        limit_bytes: limit_bytes.filter(|l| *l > 0).map(|l| l as u64),
    };
    let chunks = logs::read(log, options);
    Ok(streaming_body(chunks, "text/plain", Ok))
}
