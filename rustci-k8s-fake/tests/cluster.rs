//! The fake cluster through a real Kubernetes client (kube) over HTTPS, with pods really
//! run on the local Docker engine. Without a usable engine every test prints `SKIPPED`
//! (a failure when `RUSTCI_REQUIRE_DOCKER=1`).

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use rustci_k8s_fake::{FailureRule, NodeLoss};

fn terminated(pod: &Pod) -> (i32, String) {
    let t = pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .state
        .as_ref()
        .unwrap()
        .terminated
        .clone()
        .expect("terminated state");
    (t.exit_code, t.reason.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_code_and_split_logs() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    let p = create(
        &client,
        &pod("split", "printf 'out\\n\\000\\377'; echo err >&2; exit 3"),
    )
    .await;
    assert_eq!(phase(Some(&p)).as_deref(), Some("Pending"));
    assert_eq!(
        p.status.as_ref().unwrap().qos_class.as_deref(),
        Some("BestEffort")
    );
    let done = wait_for(&client, "split", 60, finished).await.unwrap();
    assert_eq!(phase(Some(&done)).as_deref(), Some("Failed"));
    assert_eq!(terminated(&done), (3, "Error".to_string()));
    let cs = &done
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0];
    assert!(cs.container_id.as_deref().unwrap().starts_with("docker://"));

    let base = "/api/v1/namespaces/default/pods/split/log";
    let out = get_bytes(&client, &format!("{base}?stream=Stdout"))
        .await
        .unwrap();
    assert_eq!(out, b"out\n\0\xff");
    let err = get_bytes(&client, &format!("{base}?stream=Stderr"))
        .await
        .unwrap();
    assert_eq!(err, b"err\n");
    let all = get_bytes(&client, base).await.unwrap();
    assert!(
        all == b"out\n\0\xfferr\n" || all == b"err\nout\n\0\xff",
        "{all:?}"
    );
    let limited = get_bytes(&client, &format!("{base}?stream=Stdout&limitBytes=2"))
        .await
        .unwrap();
    assert_eq!(limited, b"ou");
    let tail = get_bytes(&client, &format!("{base}?tailLines=1&container=job"))
        .await
        .unwrap();
    // Lines are cut on b'\n' in the interleaved output: the tail is its last line.
    assert!(!tail.is_empty() && all.ends_with(&tail), "{tail:?}");
    assert!(
        tail.iter().filter(|b| **b == b'\n').count() <= 1,
        "{tail:?}"
    );

    // Exited containers stay until the pod is deleted; then nothing is left.
    assert_eq!(cluster.docker_containers().await.len(), 1);
    let api: Api<Pod> = Api::default_namespaced(client.clone());
    api.delete("split", &DeleteParams::default()).await.unwrap();
    wait_for(&client, "split", 30, |p: Option<&Pod>| p.is_none()).await;
    assert!(cluster.docker_containers().await.is_empty());
    let e = get_bytes(&client, base).await.unwrap_err();
    assert_eq!(api_error(&e).0, 404);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_streams_until_exit() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    create(
        &client,
        &pod("follow", "echo a; sleep 1; echo b; sleep 1; echo c"),
    )
    .await;
    wait_for(&client, "follow", 60, |p: Option<&Pod>| {
        phase(p).as_deref() == Some("Running")
    })
    .await;
    let started = Instant::now();
    let body = get_bytes(
        &client,
        "/api/v1/namespaces/default/pods/follow/log?follow=true",
    )
    .await
    .unwrap();
    assert_eq!(body, b"a\nb\nc\n");
    assert!(started.elapsed() >= Duration::from_millis(500));
    let stamped = get_bytes(
        &client,
        "/api/v1/namespaces/default/pods/follow/log?timestamps=true",
    )
    .await
    .unwrap();
    let text = String::from_utf8(stamped).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].ends_with(" a") && lines[0].contains('T') && lines[0].contains('Z'));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_logs_stream_completely() {
    use futures::AsyncBufReadExt;
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    // 128 MiB through attach -> log file -> follow, counted as it streams.
    const SIZE: usize = 128 << 20;
    create(&client, &pod("big", &format!("head -c {SIZE} /dev/zero"))).await;
    wait_for(&client, "big", 60, |p: Option<&Pod>| {
        phase(p).is_some_and(|p| p != "Pending")
    })
    .await;
    let req = http::Request::get("/api/v1/namespaces/default/pods/big/log?follow=true")
        .body(Vec::new())
        .unwrap();
    let mut reader = Box::pin(client.request_stream(req).await.unwrap());
    let mut total = 0usize;
    loop {
        let chunk = reader.fill_buf().await.unwrap();
        if chunk.is_empty() {
            break;
        }
        assert!(chunk.iter().all(|b| *b == 0));
        let n = chunk.len();
        total += n;
        reader.consume_unpin(n);
    }
    assert_eq!(total, SIZE);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_history_answers_410() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let s: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "one"},
        "stringData": {"k": "v"},
    }))
    .unwrap();
    let created = secrets.create(&PostParams::default(), &s).await.unwrap();
    assert_eq!(created.data.unwrap()["k"].0, b"v");
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let old = pods.list(&ListParams::default()).await.unwrap();
    let old_rv = old.metadata.resource_version.unwrap();
    // Resuming from the list works before compaction...
    let mut w = pods
        .watch(&WatchParams::default().timeout(1), &old_rv)
        .await
        .unwrap()
        .boxed();
    while let Some(e) = w.next().await {
        assert!(!matches!(e.unwrap(), WatchEvent::Error(_)));
    }
    let mut s2 = s.clone();
    s2.metadata.name = Some("two".into());
    secrets.create(&PostParams::default(), &s2).await.unwrap();
    cluster.compact();
    let mut w = pods
        .watch(&WatchParams::default().timeout(5), &old_rv)
        .await
        .unwrap()
        .boxed();
    match w.next().await {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
            assert!(status.message.starts_with("too old resource version: "));
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(w.next().await.is_none(), "the stream ends after the error");
    // A watcher (kube-runtime) copes: relists and sees new pods.
    let fresh = wait_for(&client, "nothing-yet", 10, |p: Option<&Pod>| p.is_none()).await;
    assert!(fresh.is_none());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_list_and_bookmarks() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    create(&client, &pod("listed", "true")).await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let wp = WatchParams {
        send_initial_events: true,
        bookmarks: true,
        timeout: Some(3),
        ..WatchParams::default()
    };
    let mut w = pods.watch(&wp, "").await.unwrap().boxed();
    let mut seen_added = false;
    let mut initial_end = false;
    let mut plain_bookmark = false;
    while let Some(e) = w.next().await {
        match e.unwrap() {
            WatchEvent::Added(p) if !initial_end => {
                seen_added |= p.metadata.name.as_deref() == Some("listed")
            }
            WatchEvent::Bookmark(b) => {
                if b.metadata
                    .annotations
                    .contains_key("k8s.io/initial-events-end")
                {
                    initial_end = true;
                } else {
                    plain_bookmark = true;
                }
            }
            _ => {}
        }
        if initial_end && plain_bookmark {
            break;
        }
    }
    assert!(seen_added && initial_end && plain_bookmark);

    // kube-runtime's watcher in streaming-list mode reaches InitDone with the pod.
    use kube::runtime::watcher::{self, Event};
    let mut events =
        watcher::watcher(pods.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut names = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = events.next().await {
            match e.unwrap() {
                Event::InitApply(p) => names.push(p.metadata.name.unwrap()),
                Event::InitDone => return,
                _ => {}
            }
        }
    })
    .await
    .expect("InitDone within 10 s");
    assert_eq!(names, ["listed"]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduling_conditions() {
    let Some((cluster, client)) = cluster_with(|c| c.node_cpu = Some("2".into())).await else {
        return;
    };
    cluster.set_schedulable(false);
    create(&client, &pod("later", "true")).await;
    let p = wait_for(&client, "later", 30, |p: Option<&Pod>| {
        unschedulable_message(p).is_some()
    })
    .await;
    assert!(
        unschedulable_message(p.as_ref())
            .unwrap()
            .starts_with("0/1 nodes are available: 1 node(s) were unschedulable.")
    );
    cluster.set_schedulable(true);
    wait_for(&client, "later", 60, |p: Option<&Pod>| {
        phase(p).as_deref() == Some("Succeeded")
    })
    .await;

    let mut picky = pod("picky", "true");
    picky.spec.as_mut().unwrap().node_selector =
        Some([("disk".to_string(), "ssd".to_string())].into());
    create(&client, &picky).await;
    let p = wait_for(&client, "picky", 30, |p: Option<&Pod>| {
        unschedulable_message(p).is_some()
    })
    .await;
    assert!(
        unschedulable_message(p.as_ref())
            .unwrap()
            .contains("1 node(s) didn't match Pod's node affinity/selector.")
    );

    let mut greedy = pod("greedy", "true");
    greedy.spec.as_mut().unwrap().containers[0].resources =
        Some(serde_json::from_value(serde_json::json!({"requests": {"cpu": "3"}})).unwrap());
    create(&client, &greedy).await;
    let p = wait_for(&client, "greedy", 30, |p: Option<&Pod>| {
        unschedulable_message(p).is_some()
    })
    .await;
    assert!(
        unschedulable_message(p.as_ref())
            .unwrap()
            .contains("1 Insufficient cpu")
    );
    // Unscheduled pods are deleted at once.
    let api: Api<Pod> = Api::default_namespaced(client.clone());
    api.delete("greedy", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        cluster
            .pods("default")
            .iter()
            .all(|p| p.metadata.name.as_deref() != Some("greedy"))
    );

    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes.get("fake-node").await.unwrap();
    let status = node.status.unwrap();
    assert_eq!(status.allocatable.unwrap()["cpu"].0, "2");
    assert_eq!(node.metadata.labels.unwrap()["kubernetes.io/os"], "linux");
    cluster.shutdown().await;
}

fn unschedulable_message(p: Option<&Pod>) -> Option<String> {
    let c = p?
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
    (c.reason.as_deref() == Some("Unschedulable")).then(|| c.message.clone().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_pull_errors() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    let mut p = pod("nopull", "true");
    p.spec.as_mut().unwrap().containers[0].image = Some("rustci-does-not-exist:v1".into());
    create(&client, &p).await;
    let first = wait_for(&client, "nopull", 30, |p: Option<&Pod>| {
        waiting_reason(p).as_deref() == Some("ErrImagePull")
    })
    .await
    .unwrap();
    assert_eq!(phase(Some(&first)).as_deref(), Some("Pending"));
    wait_for(&client, "nopull", 30, |p: Option<&Pod>| {
        waiting_reason(p).as_deref() == Some("ImagePullBackOff")
    })
    .await;
    let e = get_bytes(&client, "/api/v1/namespaces/default/pods/nopull/log")
        .await
        .unwrap_err();
    let (code, _, message) = api_error(&e);
    assert_eq!(code, 400);
    assert_eq!(
        message,
        "container \"job\" in pod \"nopull\" is waiting to start: trying and failing to pull image"
    );

    let mut never = pod("never", "true");
    never.spec.as_mut().unwrap().containers[0].image = Some("rustci-does-not-exist:v2".into());
    never.spec.as_mut().unwrap().containers[0].image_pull_policy = Some("Never".into());
    create(&client, &never).await;
    wait_for(&client, "never", 30, |p: Option<&Pod>| {
        waiting_reason(p).as_deref() == Some("ErrImageNeverPull")
    })
    .await;

    let mut invalid = pod("invalid", "true");
    invalid.spec.as_mut().unwrap().containers[0].image = Some("Not A Valid/Reference".into());
    create(&client, &invalid).await;
    wait_for(&client, "invalid", 30, |p: Option<&Pod>| {
        waiting_reason(p).as_deref() == Some("InvalidImageName")
    })
    .await;

    let api: Api<Pod> = Api::default_namespaced(client.clone());
    api.delete("nopull", &DeleteParams::default())
        .await
        .unwrap();
    api.delete("invalid", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(&client, "invalid", 10, |p: Option<&Pod>| p.is_none()).await;
    api.delete("never", &DeleteParams::default()).await.unwrap();
    wait_for(&client, "nopull", 10, |p: Option<&Pod>| p.is_none()).await;
    wait_for(&client, "never", 10, |p: Option<&Pod>| p.is_none()).await;
    assert!(cluster.docker_containers().await.is_empty());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_delete_waits_for_the_grace_period() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    create(
        &client,
        &pod("stubborn", "trap '' TERM; while true; do sleep 1; done"),
    )
    .await;
    wait_for(&client, "stubborn", 60, |p: Option<&Pod>| {
        phase(p).as_deref() == Some("Running")
    })
    .await;
    let api: Api<Pod> = Api::default_namespaced(client.clone());
    let started = Instant::now();
    let answer = api
        .delete("stubborn", &DeleteParams::default().grace_period(3))
        .await
        .unwrap();
    let deleting = answer.left().expect("the pod, not a Status");
    assert!(deleting.metadata.deletion_timestamp.is_some());
    assert_eq!(deleting.metadata.deletion_grace_period_seconds, Some(3));
    wait_for(&client, "stubborn", 30, |p: Option<&Pod>| p.is_none()).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2900),
        "deleted after {took:?}"
    );
    assert!(cluster.docker_containers().await.is_empty());
    let e = api.get("stubborn").await.unwrap_err();
    assert_eq!(api_error(&e).0, 404);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_answers_422() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    let api: Api<Pod> = Api::default_namespaced(client.clone());
    let mut p = pod("bad-cpu", "true");
    p.spec.as_mut().unwrap().containers[0].resources =
        Some(serde_json::from_value(serde_json::json!({"limits": {"cpu": "abc"}})).unwrap());
    let e = api.create(&PostParams::default(), &p).await.unwrap_err();
    let (code, reason, message) = api_error(&e);
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert!(
        message.contains("spec.containers[0].resources.limits.cpu: Invalid value: \"abc\""),
        "{message}"
    );
    let kube::Error::Api(status) = &e else {
        unreachable!()
    };
    let causes = status.details.as_ref().unwrap().causes.clone();
    assert_eq!(causes[0].field, "spec.containers[0].resources.limits.cpu");

    let mut p = pod("Bad_Name", "true");
    p.spec.as_mut().unwrap().containers[0].image = None;
    let e = api.create(&PostParams::default(), &p).await.unwrap_err();
    let (code, _, message) = api_error(&e);
    assert_eq!(code, 422);
    assert!(
        message.contains("metadata.name: Invalid value: \"Bad_Name\""),
        "{message}"
    );
    assert!(
        message.contains("spec.containers[0].image: Required value"),
        "{message}"
    );

    // dryRun validates and stores nothing; generateName names.
    let mut p = pod("", "true");
    p.metadata.name = None;
    p.metadata.generate_name = Some("gen-".into());
    let dry = api
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &p,
        )
        .await
        .unwrap();
    assert!(dry.metadata.name.unwrap().starts_with("gen-"));
    assert!(cluster.pods("default").is_empty());

    // Name clash and missing namespace.
    create(&client, &pod("twice", "true")).await;
    let e = api
        .create(&PostParams::default(), &pod("twice", "true"))
        .await
        .unwrap_err();
    assert_eq!(api_error(&e).0, 409);
    assert_eq!(api_error(&e).1, "AlreadyExists");
    let elsewhere: Api<Pod> = Api::namespaced(client.clone(), "nowhere");
    let e = elsewhere
        .create(&PostParams::default(), &pod("x", "true"))
        .await
        .unwrap_err();
    assert_eq!(
        api_error(&e),
        (
            404,
            "NotFound".into(),
            "namespaces \"nowhere\" not found".into()
        )
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_token_are_required() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    assert!(cluster.url().starts_with("https://127.0.0.1:"));
    let v = client.apiserver_version().await.unwrap();
    assert_eq!((v.major.as_str(), v.minor.as_str()), ("1", "37"));
    let ns: Api<Namespace> = Api::all(client.clone());
    ns.get("ci").await.unwrap();
    let e = ns.get("nope").await.unwrap_err();
    assert_eq!(api_error(&e).0, 404);

    let wrong = cluster
        .kubeconfig("default")
        .replace(cluster.token(), "not-the-token");
    let bad = client_for(&wrong).await.unwrap();
    let e = Api::<Pod>::default_namespaced(bad)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert_eq!(api_error(&e).0, 401);
    assert_eq!(api_error(&e).1, "Unauthorized");

    // Without the CA the server is not trusted.
    let kc = cluster.kubeconfig("default");
    let no_ca: String = kc
        .lines()
        .filter(|l| !l.contains("certificate-authority-data"))
        .collect::<Vec<_>>()
        .join("\n");
    let untrusting = client_for(&no_ca).await.unwrap();
    assert!(untrusting.apiserver_version().await.is_err());

    let recorded = cluster.requests();
    assert!(
        recorded
            .iter()
            .any(|r| r.path == "/version" && r.status == 200)
    );
    assert!(recorded.iter().any(|r| r.status == 401));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_failures_and_forbidden() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    let api: Api<Pod> = Api::default_namespaced(client.clone());
    cluster.inject_failure(FailureRule {
        method: Some("POST".into()),
        path_contains: "/pods".into(),
        status: 500,
        times: 1,
    });
    let e = api
        .create(&PostParams::default(), &pod("flaky", "true"))
        .await
        .unwrap_err();
    assert_eq!(api_error(&e).0, 500);
    assert_eq!(api_error(&e).1, "InternalError");
    // kube's client retries 503 by itself: one injected 503 is invisible to the caller.
    cluster.inject_failure(FailureRule {
        method: None,
        path_contains: "/api/v1/namespaces/default/pods".into(),
        status: 503,
        times: 1,
    });
    create(&client, &pod("flaky", "true")).await;

    cluster.forbid("create", "secrets");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "ci");
    let s: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
    }))
    .unwrap();
    let e = secrets
        .create(&PostParams::default(), &s)
        .await
        .unwrap_err();
    assert_eq!(
        api_error(&e),
        (
            403,
            "Forbidden".into(),
            "secrets is forbidden: User \"rustci\" cannot create resource \"secrets\" in API group \"\" in the namespace \"ci\"".into()
        )
    );
    let statuses: Vec<u16> = cluster
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![500, 503, 201, 403]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_feed_env_and_unblock_waiting_pods() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    let mut p = pod("envy", "echo \"$TOKEN $POD\"");
    p.spec.as_mut().unwrap().containers[0].env = Some(
        serde_json::from_value(serde_json::json!([
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ]))
        .unwrap(),
    );
    create(&client, &p).await;
    let waiting = wait_for(&client, "envy", 30, |p: Option<&Pod>| {
        waiting_reason(p).as_deref() == Some("CreateContainerConfigError")
    })
    .await
    .unwrap();
    let message = waiting.status.unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .waiting
        .unwrap()
        .message
        .unwrap();
    assert_eq!(message, "secret \"creds\" not found");
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let s: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
        "stringData": {"token": "s3cret"},
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &s).await.unwrap();
    wait_for(&client, "envy", 60, |p: Option<&Pod>| {
        phase(p).as_deref() == Some("Succeeded")
    })
    .await;
    let out = get_bytes(&client, "/api/v1/namespaces/default/pods/envy/log")
        .await
        .unwrap();
    assert_eq!(out, b"s3cret envy\n");
    assert_eq!(cluster.secrets("default").len(), 1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_deadline_fails_the_pod() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    let mut p = pod("slow", "sleep 100");
    let spec = p.spec.as_mut().unwrap();
    spec.active_deadline_seconds = Some(1);
    spec.termination_grace_period_seconds = Some(1);
    create(&client, &p).await;
    let done = wait_for(&client, "slow", 60, finished).await.unwrap();
    let status = done.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    assert_eq!(status.reason.as_deref(), Some("DeadlineExceeded"));
    assert_eq!(
        status.message.as_deref(),
        Some("Pod was active on the node longer than the specified deadline")
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_node() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    create(&client, &pod("victim", "sleep 100")).await;
    create(&client, &pod("gone", "sleep 100")).await;
    for name in ["victim", "gone"] {
        wait_for(&client, name, 60, |p: Option<&Pod>| {
            phase(p).as_deref() == Some("Running")
        })
        .await;
    }
    let api: Api<Pod> = Api::default_namespaced(client.clone());
    cluster.lose_node(NodeLoss::FailPods).await;
    let failed = api.get("victim").await.unwrap();
    let status = failed.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    assert_eq!(status.reason.as_deref(), Some("NodeLost"));
    assert_eq!(
        status.message.as_deref(),
        Some("Node fake-node which was running pod victim is unresponsive")
    );
    // Container statuses stay as they were.
    assert!(
        status.container_statuses.unwrap()[0]
            .state
            .as_ref()
            .unwrap()
            .running
            .is_some()
    );

    create(&client, &pod("next", "sleep 100")).await;
    wait_for(&client, "next", 60, |p: Option<&Pod>| {
        phase(p).as_deref() == Some("Running")
    })
    .await;
    cluster.lose_node(NodeLoss::DeletePods).await;
    assert!(cluster.pods("default").is_empty());
    assert!(cluster.docker_containers().await.is_empty());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_end_abruptly() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let mut w = pods
        .watch(&WatchParams::default().timeout(60), "0")
        .await
        .unwrap()
        .boxed();
    cluster.drop_watches();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match w.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(WatchEvent::Error(s))) => panic!("unexpected ERROR event {s:?}"),
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch did not end");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_and_paging() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    cluster.set_schedulable(false);
    for i in 0..5 {
        let mut p = pod(&format!("p{i}"), "true");
        p.metadata.labels = Some(
            [
                ("idx".to_string(), i.to_string()),
                (
                    "parity".to_string(),
                    if i % 2 == 0 { "even" } else { "odd" }.into(),
                ),
            ]
            .into(),
        );
        create(&client, &p).await;
    }
    let api: Api<Pod> = Api::default_namespaced(client.clone());
    let names = |l: &kube::api::ObjectList<Pod>| {
        l.items
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect::<Vec<_>>()
    };
    let even = api
        .list(&ListParams::default().labels("parity=even"))
        .await
        .unwrap();
    assert_eq!(names(&even), ["p0", "p2", "p4"]);
    let some = api
        .list(&ListParams::default().labels("idx in (1,3),parity!=even"))
        .await
        .unwrap();
    assert_eq!(names(&some), ["p1", "p3"]);
    let one = api
        .list(&ListParams::default().fields("metadata.name=p2"))
        .await
        .unwrap();
    assert_eq!(names(&one), ["p2"]);
    let page1 = api.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(names(&page1), ["p0", "p1"]);
    let token = page1.metadata.continue_.clone().unwrap();
    let page2 = api
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(names(&page2), ["p2", "p3"]);
    let page3 = api
        .list(
            &ListParams::default()
                .limit(2)
                .continue_token(page2.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(names(&page3), ["p4"]);
    assert!(page3.metadata.continue_.is_none());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pods_at_once() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    let n = 50;
    let names: Vec<String> = (0..n).map(|i| format!("many-{i}")).collect();
    let pods: Vec<Pod> = names
        .iter()
        .map(|name| pod(name, "echo $HOSTNAME"))
        .collect();
    futures::future::join_all(pods.iter().map(|p| create(&client, p))).await;
    for name in &names {
        let p = wait_for(&client, name, 120, finished).await.unwrap();
        assert_eq!(phase(Some(&p)).as_deref(), Some("Succeeded"), "{name}");
        let out = get_bytes(
            &client,
            &format!("/api/v1/namespaces/default/pods/{name}/log"),
        )
        .await
        .unwrap();
        assert_eq!(out, format!("{name}\n").as_bytes());
    }
    let api: Api<Pod> = Api::default_namespaced(client.clone());
    for name in &names {
        let _ = api.delete(name, &DeleteParams::default()).await;
    }
    for name in &names {
        wait_for(&client, name, 60, |p: Option<&Pod>| p.is_none()).await;
    }
    assert!(cluster.docker_containers().await.is_empty());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_security_and_two_containers() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let s: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vol-secret"},
        "stringData": {"key": "SECRET"},
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &s).await.unwrap();
    let script = "id -u; id -g; echo hi > /work/f && cat /work/f; echo x > /cache/keep; \
                  cat /creds/key; echo; touch /rootfile 2>/dev/null && echo rw || echo ro";
    let p: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "vols"},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"fsGroup": 2000, "runAsUser": 1000, "runAsGroup": 3000},
            "volumes": [
                {"name": "work", "emptyDir": {}},
                {"name": "cache", "persistentVolumeClaim": {"claimName": "cache"}},
                {"name": "creds", "secret": {"secretName": "vol-secret"}},
            ],
            "containers": [
                {
                    "name": "job", "image": IMAGE, "command": ["sh", "-c", script],
                    "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false},
                    "volumeMounts": [
                        {"name": "work", "mountPath": "/work"},
                        {"name": "cache", "mountPath": "/cache"},
                        {"name": "creds", "mountPath": "/creds", "readOnly": true},
                    ],
                },
                {"name": "side", "image": IMAGE, "command": ["sh", "-c", "echo side"]},
            ],
        },
    }))
    .unwrap();
    create(&client, &p).await;
    let done = wait_for(&client, "vols", 60, finished).await.unwrap();
    assert_eq!(phase(Some(&done)).as_deref(), Some("Succeeded"));
    let e = get_bytes(&client, "/api/v1/namespaces/default/pods/vols/log")
        .await
        .unwrap_err();
    assert_eq!(
        api_error(&e).2,
        "a container name must be specified for pod vols, choose one of: [job side]"
    );
    let out = get_bytes(
        &client,
        "/api/v1/namespaces/default/pods/vols/log?container=job",
    )
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out),
        "1000\n3000\nhi\nSECRET\nro\n"
    );
    let side = get_bytes(
        &client,
        "/api/v1/namespaces/default/pods/vols/log?container=side",
    )
    .await
    .unwrap();
    assert_eq!(side, b"side\n");

    // The claim's directory outlives the pod.
    let mut reader = pod("reader", "cat /cache/keep");
    let spec = reader.spec.as_mut().unwrap();
    spec.volumes = Some(
        serde_json::from_value(serde_json::json!([
            {"name": "cache", "persistentVolumeClaim": {"claimName": "cache"}},
        ]))
        .unwrap(),
    );
    spec.containers[0].volume_mounts = Some(
        serde_json::from_value(serde_json::json!([{"name": "cache", "mountPath": "/cache"}]))
            .unwrap(),
    );
    create(&client, &reader).await;
    wait_for(&client, "reader", 60, finished).await;
    let out = get_bytes(&client, "/api/v1/namespaces/default/pods/reader/log")
        .await
        .unwrap();
    assert_eq!(out, b"x\n");

    // runAsNonRoot with an image running as root is refused.
    let mut rooty = pod("rooty", "true");
    rooty.spec.as_mut().unwrap().security_context =
        Some(serde_json::from_value(serde_json::json!({"runAsNonRoot": true})).unwrap());
    create(&client, &rooty).await;
    let p = wait_for(&client, "rooty", 30, |p: Option<&Pod>| {
        waiting_reason(p).as_deref() == Some("CreateContainerConfigError")
    })
    .await
    .unwrap();
    let message = p.status.unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .waiting
        .unwrap()
        .message
        .unwrap();
    assert!(
        message.starts_with("container has runAsNonRoot and image will run as root"),
        "{message}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_oom_kills() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    let mut p = pod("hungry", "head -c 400000000 /dev/zero | tail");
    p.spec.as_mut().unwrap().containers[0].resources = Some(
        serde_json::from_value(serde_json::json!({"limits": {"memory": "32Mi", "cpu": "1"}}))
            .unwrap(),
    );
    let created = create(&client, &p).await;
    assert_eq!(
        created.status.unwrap().qos_class.as_deref(),
        Some("Guaranteed")
    );
    let done = wait_for(&client, "hungry", 120, finished).await.unwrap();
    assert_eq!(phase(Some(&done)).as_deref(), Some("Failed"));
    assert_eq!(terminated(&done).1, "OOMKilled");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_removes_containers() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    create(&client, &pod("left-behind", "sleep 100")).await;
    wait_for(&client, "left-behind", 60, |p: Option<&Pod>| {
        phase(p).as_deref() == Some("Running")
    })
    .await;
    assert_eq!(cluster.docker_containers().await.len(), 1);
    let id = cluster.cluster_id().to_string();
    drop(cluster);
    let out = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter"])
        .arg(format!("label=rustci.fake-cluster={id}"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

/// Waits (bounded) until the cluster has no Docker container left.
async fn until_no_containers(cluster: &rustci_k8s_fake::FakeCluster, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cluster.docker_containers().await.is_empty() {
        assert!(Instant::now() < deadline, "containers left after {secs}s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_and_shortened_deletes() {
    let Some((cluster, client)) = cluster().await else {
        return;
    };
    for name in ["now", "shorter"] {
        create(
            &client,
            &pod(name, "trap '' TERM; while true; do sleep 1; done"),
        )
        .await;
        wait_for(&client, name, 60, |p: Option<&Pod>| {
            phase(p).as_deref() == Some("Running")
        })
        .await;
    }
    let api: Api<Pod> = Api::default_namespaced(client.clone());
    // Grace 0: gone from the API at once; the kubelet kills and removes in the background.
    api.delete("now", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert!(api.get_opt("now").await.unwrap().is_none());

    // A second delete with a shorter grace shortens the first one's 60 s.
    api.delete("shorter", &DeleteParams::default().grace_period(60))
        .await
        .unwrap();
    let again = api
        .delete("shorter", &DeleteParams::default().grace_period(1))
        .await
        .unwrap()
        .left()
        .unwrap();
    assert_eq!(again.metadata.deletion_grace_period_seconds, Some(1));
    // Bounded at 30 s: the first delete's 60 s would not be.
    wait_for(&client, "shorter", 30, |p: Option<&Pod>| p.is_none()).await;
    until_no_containers(&cluster, 20).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_container_path() {
    if image().is_none() {
        return;
    }
    let docker = bollard::Docker::connect_with_defaults().unwrap();
    let cmd = ["sh", "-c", "echo hi; exit 7"].map(String::from).to_vec();
    let code = rustci_k8s_fake::run_container_direct(&docker, IMAGE, cmd, "bridge")
        .await
        .unwrap();
    assert_eq!(code, 7);
}
