//! KubernetesRunner's own behaviour against the fake cluster: where secrets live, what a
//! job costs in API requests, pod options, and every failure mode — unschedulable pods,
//! missing images, OOM kills, the pod deadline, node loss, watches that drop or expire,
//! server errors, conflicts, forbidden APIs and bad configuration — each ending with
//! nothing left in the cluster or on the engine.

mod common;

use std::time::Duration;

use common::{IMAGE, NAMESPACE, OnCluster, assert_nothing_left, cluster, cluster_with, runner_on};
use rustci_k8s_fake::{FailureRule, NodeLoss};
use rustci_runners::job::Resources;
use rustci_runners::testkit::{Target, run_job};
use rustci_runners::{
    EventKind, Execution, Job, JobId, Outcome, OutputStream, Runner, RunnerExt, Step,
};
use rustci_runners_k8s::{Connection, KubernetesConfig, KubernetesRunner, PodPatch};

const LIMIT: Duration = Duration::from_secs(120);

/// `script`, then a line longer than any secret of these tests (masking holds back the
/// last `longest secret - 1` bytes until more output comes), then a long sleep.
#[allow(non_snake_case)]
fn FILLER_AFTER(script: &str) -> String {
    format!("{script}; echo ----------------------------------------; sleep 300")
}

fn job(steps: Vec<Step>) -> Job {
    let mut j = Job::new("k8s-test", steps);
    j.image = Some(IMAGE.into());
    j
}

/// Reads events until stdout contains `marker`; returns what was read.
async fn until_output(execution: &mut Execution, marker: &str) -> String {
    let mut out = String::new();
    let wait = async {
        while let Some(event) = execution.next_event().await {
            if let EventKind::Output {
                stream: OutputStream::Stdout,
                data,
                ..
            } = &event.kind
            {
                out.push_str(&String::from_utf8_lossy(data));
                if out.contains(marker) {
                    return;
                }
            }
        }
        panic!("the job ended before printing {marker:?}: {out:?}");
    };
    tokio::time::timeout(LIMIT, wait)
        .await
        .unwrap_or_else(|_| panic!("no {marker:?} within {LIMIT:?}"));
    out
}

/// Reads the rest of the events, appending stdout to `out`; returns the outcome.
async fn read_rest(execution: &mut Execution, out: &mut String) -> Outcome {
    let mut outcome = None;
    while let Some(event) = tokio::time::timeout(LIMIT, execution.next_event())
        .await
        .expect("the job did not end")
    {
        match event.kind {
            EventKind::Output {
                stream: OutputStream::Stdout,
                data,
                ..
            } => out.push_str(&String::from_utf8_lossy(&data)),
            EventKind::Finished { outcome: o } => outcome = Some(o),
            _ => {}
        }
    }
    outcome.expect("no Finished event")
}

async fn finish(execution: Execution) -> Outcome {
    tokio::time::timeout(LIMIT, execution.wait())
        .await
        .expect("the job did not end")
}

/// Requests other than those of the runner's shared watch (its lists and watches by label
/// selector), which serve all jobs.
fn requests_without_watches(cluster: &rustci_k8s_fake::FakeCluster) -> Vec<String> {
    cluster
        .requests()
        .into_iter()
        .filter(|r| {
            !r.query.contains("watch=true")
                && !r.query.contains("watch=1")
                && !r.query.contains("labelSelector=rustci.managed")
        })
        .map(|r| format!("{} {}?{} -> {}", r.method, r.path, r.query, r.status))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_live_in_a_secret_that_goes_with_the_pod() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let runner = runner_on(&cluster, |_| {}).await;
    let j = job(vec![Step::run(FILLER_AFTER(
        "echo \"token=$TOKEN\"; echo ready",
    ))])
    .with_secret("TOKEN", "s3cr3t-in-a-Secret");
    let mut execution = runner.start(&j, JobId::new()).await.unwrap();
    let out = until_output(&mut execution, "ready").await;
    assert!(out.contains("token=***"), "{out}");
    let pods = cluster.pods(NAMESPACE);
    assert_eq!(pods.len(), 1);
    let pod_json = serde_json::to_string(&pods[0]).unwrap();
    assert!(
        !pod_json.contains("s3cr3t-in-a-Secret"),
        "the pod spec shows the secret"
    );
    assert!(pod_json.contains("secretKeyRef"), "{pod_json}");
    let secrets = cluster.secrets(NAMESPACE);
    assert_eq!(secrets.len(), 1, "one Secret for the job");
    let labels = secrets[0].metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("rustci.job").map(String::as_str),
        Some(execution.id().as_str())
    );
    execution.cancel();
    assert_eq!(finish(execution).await, Outcome::Cancelled);
    assert_nothing_left(&cluster).await;
}

/// At most six requests per job whatever its length (create Secret and Pod, two log
/// streams, delete Pod and Secret); the shared watch is not per job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requests_per_job_are_bounded() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let runner = runner_on(&cluster, |_| {}).await;
    // A first job: the shared watch is established by the time it ends.
    let warm = runner
        .run_to_completion(&job(vec![Step::run("true")]))
        .await;
    assert_eq!(warm.unwrap(), Outcome::Succeeded);
    for steps in [1, 25] {
        for secret in [false, true] {
            let mut j = job((0..steps)
                .map(|i| Step::run(format!("echo step-{i}")))
                .collect());
            if secret {
                j = j.with_secret("TOKEN", "abcdefgh");
            }
            cluster.reset_requests();
            let run = runner.run_collect(&j).await.unwrap();
            assert_eq!(run.outcome, Outcome::Succeeded, "{:?}", run.stderr);
            assert_eq!(run.stdout.iter().filter(|b| **b == b'\n').count(), steps);
            let requests = requests_without_watches(&cluster);
            let expected = if secret { 6 } else { 4 };
            assert_eq!(
                requests.len(),
                expected,
                "{steps} steps, secret {secret}: {requests:#?}"
            );
            assert!(
                requests.iter().all(|r| !r.contains("-> 5")),
                "{requests:#?}"
            );
        }
    }
    assert_nothing_left(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_options_reach_the_cluster_and_take_effect() {
    let Some(cluster) = cluster_with(|c| {
        c.node_labels.insert("disk".into(), "ssd".into());
        c.node_taints = vec![k8s_openapi_taint("dedicated", "ci")];
    })
    .await
    else {
        return;
    };
    let runner = runner_on(&cluster, |c| {
        c.pod.node_selector.insert("disk".into(), "ssd".into());
        c.pod.tolerations = vec![
            serde_json::from_value(serde_json::json!({
                "key": "dedicated", "operator": "Equal", "value": "ci", "effect": "NoSchedule"
            }))
            .unwrap(),
        ];
        c.pod.labels.insert("team".into(), "infra".into());
        c.pod
            .annotations
            .insert("example.com/owner".into(), "ci".into());
        c.pod.security.run_as_user = Some(1000);
        c.pod.security.run_as_group = Some(3000);
        c.pod.security.fs_group = Some(2000);
        c.pod.security.read_only_root_filesystem = true;
        c.pod.limits.insert("memory".into(), "256Mi".into());
        c.pod.patch = Some(PodPatch::Strategic(serde_json::json!({
            "containers": [{"name": "job", "env": [{"name": "FROM_PATCH", "value": "yes"}]}]
        })));
    })
    .await;
    let j = job(vec![Step::run(
        "echo \"uid=$(id -u) gid=$(id -g) patch=$FROM_PATCH\"; \
         touch /workspace/f && echo workspace-writable; \
         if touch /root-fs-file 2>/dev/null; then echo root-writable; else echo root-read-only; fi; \
         echo ready; sleep 300",
    )]);
    let mut execution = runner.start(&j, JobId::new()).await.unwrap();
    let out = until_output(&mut execution, "ready").await;
    assert!(out.contains("uid=1000 gid=3000 patch=yes"), "{out}");
    assert!(out.contains("workspace-writable"), "{out}");
    assert!(out.contains("root-read-only"), "{out}");
    let pod = cluster.pods(NAMESPACE).remove(0);
    let meta = &pod.metadata;
    assert_eq!(meta.labels.as_ref().unwrap()["team"], "infra");
    assert_eq!(
        meta.annotations.as_ref().unwrap()["example.com/owner"],
        "ci"
    );
    let spec = pod.spec.unwrap();
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(spec.termination_grace_period_seconds, Some(1));
    assert!(spec.active_deadline_seconds.is_some());
    let c = &spec.containers[0];
    assert_eq!(
        c.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0,
        "256Mi"
    );
    execution.cancel();
    assert_eq!(finish(execution).await, Outcome::Cancelled);
    assert_nothing_left(&cluster).await;
}

fn k8s_openapi_taint(
    key: &str,
    value: &str,
) -> rustci_runners_k8s::k8s_openapi::api::core::v1::Taint {
    serde_json::from_value(serde_json::json!({"key": key, "value": value, "effect": "NoSchedule"}))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedulable_pod_fails_with_the_schedulers_reason() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let runner = runner_on(&cluster, |c| {
        c.pod.node_selector.insert("gpu".into(), "a100".into());
        c.pending_timeout = Duration::from_secs(2);
    })
    .await;
    let outcome = runner
        .run_to_completion(&job(vec![Step::run("true")]))
        .await
        .unwrap();
    let Outcome::RunnerError { message, temporary } = &outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        temporary,
        "an unschedulable pod may schedule later: {outcome:?}"
    );
    assert!(message.contains("Unschedulable"), "{message}");
    assert!(message.contains("node affinity/selector"), "{message}");
    assert_nothing_left(&cluster).await;

    // A cluster that cannot schedule anything at the moment: same, with its reason.
    cluster.set_schedulable(false);
    let runner = runner_on(&cluster, |c| c.pending_timeout = Duration::from_secs(2)).await;
    let outcome = runner
        .run_to_completion(&job(vec![Step::run("true")]))
        .await
        .unwrap();
    assert!(
        matches!(&outcome, Outcome::RunnerError { message, .. } if message.contains("unschedulable")),
        "{outcome:?}"
    );
    // Once nodes take pods again, a job that waits long enough runs.
    let runner = runner_on(&cluster, |c| c.pending_timeout = Duration::from_secs(60)).await;
    let mut execution = runner
        .start(&job(vec![Step::run("echo ran")]), JobId::new())
        .await
        .unwrap();
    cluster.set_schedulable(true);
    let mut out = String::new();
    assert_eq!(
        read_rest(&mut execution, &mut out).await,
        Outcome::Succeeded
    );
    assert_eq!(out, "ran\n");
    assert_nothing_left(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_fails_with_the_pull_error() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let runner = runner_on(&cluster, |c| c.pending_timeout = Duration::from_secs(2)).await;
    let mut j = job(vec![Step::run("true")]);
    j.image = Some("rustci-absent-image:1".into());
    let outcome = runner.run_to_completion(&j).await.unwrap();
    let Outcome::RunnerError { message, temporary } = &outcome else {
        panic!("{outcome:?}")
    };
    assert!(temporary, "a registry may answer later: {outcome:?}");
    assert!(
        message.contains("ErrImagePull") || message.contains("ImagePullBackOff"),
        "{message}"
    );
    assert!(message.contains("rustci-absent-image:1"), "{message}");
    assert_nothing_left(&cluster).await;

    // With pull policy Never the reason cannot go away: the job fails without waiting.
    let runner = runner_on(&cluster, |c| {
        c.pending_timeout = Duration::from_secs(3600);
        c.pod.image_pull_policy = Some(rustci_runners_k8s::PullPolicy::Never);
    })
    .await;
    let outcome = tokio::time::timeout(LIMIT, runner.run_to_completion(&j))
        .await
        .expect("a job whose image can never be pulled waited for it")
        .unwrap();
    assert!(
        matches!(&outcome, Outcome::RunnerError { message, temporary: false } if message.contains("ErrImageNeverPull")),
        "{outcome:?}"
    );
    assert_nothing_left(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_is_an_oom_outcome() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let runner = runner_on(&cluster, |_| {}).await;
    let mut j = job(vec![
        Step::run("echo before"),
        Step::run("x=$(head -c 400000000 /dev/zero | tr '\\0' a); echo survived"),
    ]);
    j.resources = Resources {
        memory: Some(64 << 20),
        ..Resources::default()
    };
    let run = runner.run_collect(&j).await.unwrap();
    assert!(
        matches!(
            run.outcome,
            Outcome::Signalled {
                step: 1,
                signal: 9,
                oom_killed: true,
                ..
            }
        ),
        "{:?}",
        run.outcome
    );
    assert_eq!(String::from_utf8_lossy(&run.stdout), "before\n");
    assert_nothing_left(&cluster).await;
}

/// The pod's `activeDeadlineSeconds` (set here through a patch) ends the job as a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_deadline_exceeded_is_a_timeout() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let runner = runner_on(&cluster, |c| {
        c.pod.patch = Some(PodPatch::Merge(
            serde_json::json!({"activeDeadlineSeconds": 2}),
        ));
    })
    .await;
    let j = job(vec![
        Step::run("echo first"),
        Step::run("echo second; sleep 300"),
    ]);
    let run = runner.run_collect(&j).await.unwrap();
    assert_eq!(run.outcome, Outcome::TimedOut { step: Some(1) });
    assert_eq!(String::from_utf8_lossy(&run.stdout), "first\nsecond\n");
    assert_nothing_left(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_loss_makes_running_jobs_lost() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let runner = runner_on(&cluster, |_| {}).await;
    for how in [NodeLoss::DeletePods, NodeLoss::FailPods] {
        let j = job(vec![
            Step::run("echo started; sleep 300"),
            Step::run("echo never"),
        ]);
        let mut execution = runner.start(&j, JobId::new()).await.unwrap();
        until_output(&mut execution, "started").await;
        cluster.lose_node(how).await;
        assert_eq!(finish(execution).await, Outcome::Lost, "{how:?}");
        assert_nothing_left(&cluster).await;
    }
}

/// The shared watch drops mid-job and its history expires (so it resumes into `410 Gone`
/// and re-lists): the job's end is still seen, with its output whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_drop_and_410_mid_job_are_survived() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let runner = runner_on(&cluster, |_| {}).await;
    let j = job(vec![
        Step::run("echo first; sleep 3; echo second"),
        Step::run("exit 7"),
    ]);
    let mut execution = runner.start(&j, JobId::new()).await.unwrap();
    let mut out = until_output(&mut execution, "first").await;
    cluster.compact();
    cluster.drop_watches();
    let outcome = read_rest(&mut execution, &mut out).await;
    assert_eq!(out, "first\nsecond\n");
    assert!(
        matches!(
            outcome,
            Outcome::Failed {
                step: 1,
                exit_code: 7,
                ..
            }
        ),
        "{outcome:?}"
    );
    assert_nothing_left(&cluster).await;
    // Watch requests after the drop: the watcher came back (a list after the 410).
    let watches = cluster
        .requests()
        .iter()
        .filter(|r| r.query.contains("watch=true") || r.query.contains("watch=1"))
        .count();
    assert!(watches >= 2, "the watch was not re-established");
}

/// 5xx answers to creates and deletes are retried; the job runs once and leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let runner = runner_on(&cluster, |_| {}).await;
    cluster.inject_failure(FailureRule::new("POST", "/secrets", 500, 1));
    cluster.inject_failure(FailureRule::new("POST", "/pods", 503, 2));
    cluster.inject_failure(FailureRule::new("DELETE", "/pods/", 500, 1));
    cluster.inject_failure(FailureRule::new("DELETE", "/secrets/", 503, 1));
    let j = job(vec![Step::run("echo once")]).with_secret("TOKEN", "abcdefgh");
    let run = runner.run_collect(&j).await.unwrap();
    assert_eq!(run.outcome, Outcome::Succeeded);
    assert_eq!(run.stdout, b"once\n");
    assert_nothing_left(&cluster).await;
}

/// Refusals the runner cannot fix are errors from `start` naming the cause, and whatever
/// was created before the refusal is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_creates_are_clear_errors_and_leave_nothing() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let runner = runner_on(&cluster, |_| {}).await;
    let j = job(vec![Step::run("true")]).with_secret("TOKEN", "abcdefgh");

    cluster.inject_failure(FailureRule::new("POST", "/pods", 409, 1));
    let e = runner
        .start(&j, JobId::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot create pod") && e.contains("409"), "{e}");
    assert_nothing_left(&cluster).await;

    cluster.forbid("create", "pods");
    let e = runner.start(&j, JobId::new()).await.unwrap_err();
    assert_eq!(
        e.kind(),
        Some(rustci_runners::ErrorKind::InvalidConfig),
        "{e:?}"
    );
    assert!(!e.is_temporary(), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("forbidden") && e.contains("403"), "{e}");
    assert_nothing_left(&cluster).await;
    assert_eq!(runner.running(), 0, "a refused job keeps no slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_refused_before_any_pod() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let file = common::kubeconfig(&cluster);
    let garbage = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(garbage.path(), "this: [is not a kubeconfig").unwrap();
    type Case = (&'static str, Box<dyn Fn(&mut KubernetesConfig)>);
    let cases: Vec<Case> = vec![
        (
            "kubeconfig /nonexistent/kubeconfig",
            Box::new(|c| {
                c.connection = Connection::Kubeconfig {
                    path: Some("/nonexistent/kubeconfig".into()),
                    context: None,
                }
            }),
        ),
        (
            "kubeconfig",
            Box::new(move |c| {
                c.connection = Connection::Kubeconfig {
                    path: Some(garbage.path().to_path_buf()),
                    context: None,
                }
            }),
        ),
        (
            "context \"nowhere\"",
            Box::new({
                let path = file.path().to_path_buf();
                move |c| {
                    c.connection = Connection::Kubeconfig {
                        path: Some(path.clone()),
                        context: Some("nowhere".into()),
                    }
                }
            }),
        ),
        (
            "namespace \"absent\" does not exist",
            Box::new(|c| c.namespace = Some("absent".into())),
        ),
        (
            "pod.requests.cpu: \"lots\" is not a Kubernetes quantity",
            Box::new(|c| {
                c.pod.requests.insert("cpu".into(), "lots".into());
            }),
        ),
        (
            "pod.patch does not apply",
            Box::new(|c| {
                c.pod.patch = Some(PodPatch::Json(serde_json::json!([
                    {"op": "remove", "path": "/no/such/field"}
                ])))
            }),
        ),
    ];
    for (expected, adjust) in cases {
        let mut config = common::config(&file);
        adjust(&mut config);
        let e = KubernetesRunner::connect(config)
            .await
            .err()
            .unwrap_or_else(|| panic!("accepted a configuration with {expected}"));
        assert!(e.to_string().contains(expected), "{expected}: {e}");
    }
    // A runner that may not list pods is refused at connect.
    cluster.forbid("list", "pods");
    let e = KubernetesRunner::connect(common::config(&file))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cannot list pods") && e.contains("403"), "{e}");
    let posts = cluster
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && !r.query.contains("dryRun"))
        .count();
    assert_eq!(posts, 0, "something was created");
    assert_nothing_left(&cluster).await;
}

/// A runner starting under the name of one that died removes what that one left; objects
/// of a live runner of the same name, and of other names, are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_removes_what_a_dead_runner_left() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let client = kube_client(&cluster).await;
    let host = rustci_runners::owner::this_host();
    let dead = format!("{host}/999999999/1");
    let live = rustci_runners::owner::owner_token();
    // What a crashed runner "swept" left: a running pod and its secret.
    leftover(&client, "left-dead", "swept", &dead).await;
    // A live runner of the same name here, and a runner of another name.
    leftover(&client, "left-live", "swept", &live).await;
    leftover(&client, "left-other", "other", &dead).await;
    let runner = runner_on(&cluster, |c| c.name = "swept".into()).await;
    let names = |v: Vec<Option<String>>| {
        let mut v: Vec<String> = v.into_iter().flatten().collect();
        v.sort();
        v
    };
    let pods = names(
        cluster
            .pods(NAMESPACE)
            .into_iter()
            .map(|p| p.metadata.name)
            .collect(),
    );
    assert_eq!(pods, ["left-live", "left-other"]);
    let secrets = names(
        cluster
            .secrets(NAMESPACE)
            .into_iter()
            .map(|s| s.metadata.name)
            .collect(),
    );
    assert_eq!(secrets, ["left-live", "left-other"]);
    // Clean up the two that were kept, then nothing is left.
    drop(runner);
    for name in ["left-live", "left-other"] {
        delete(&client, name).await;
    }
    assert_nothing_left(&cluster).await;
}

async fn kube_client(cluster: &rustci_k8s_fake::FakeCluster) -> kube::Client {
    let kc = kube::config::Kubeconfig::from_yaml(&cluster.kubeconfig(NAMESPACE)).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

type Pod = rustci_runners_k8s::k8s_openapi::api::core::v1::Pod;
type Secret = rustci_runners_k8s::k8s_openapi::api::core::v1::Secret;

/// A pod running `sleep 300` and a secret, both named `name`, as a runner called
/// `runner` owned by `owner` would have made them.
async fn leftover(client: &kube::Client, name: &str, runner: &str, owner: &str) {
    use kube::api::{Api, PostParams};
    let meta = serde_json::json!({
        "name": name,
        "labels": {"rustci.managed": "true", "rustci.runner.name": runner,
                   "rustci.runner": "gone", "rustci.job": name},
        "annotations": {"rustci.owner": owner},
    });
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": meta,
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "job", "image": IMAGE, "command": ["sleep", "300"]}]},
    }))
    .unwrap();
    let secret: Secret =
        serde_json::from_value(serde_json::json!({"metadata": meta, "stringData": {"K": "v"}}))
            .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}

async fn delete(client: &kube::Client, name: &str) {
    use futures::StreamExt;
    use kube::api::{Api, DeleteParams, WatchEvent, WatchParams};
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let wp = WatchParams::default().fields(&format!("metadata.name={name}"));
    let mut events = pods.watch(&wp, "0").await.unwrap().boxed();
    pods.delete(name, &DeleteParams::default()).await.unwrap();
    secrets
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    let gone = async {
        while let Some(e) = events.next().await {
            if matches!(e, Ok(WatchEvent::Deleted(_))) {
                return;
            }
        }
    };
    tokio::time::timeout(LIMIT, gone)
        .await
        .expect("the pod was not deleted");
}

/// `abandon` (what a restarted control plane calls) removes a job's pod and secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandon_removes_a_jobs_objects() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let runner = runner_on(&cluster, |_| {}).await;
    let j = job(vec![Step::run(FILLER_AFTER("echo started"))]).with_secret("TOKEN", "abcdefgh");
    let mut execution = runner.start(&j, JobId::new()).await.unwrap();
    until_output(&mut execution, "started").await;
    runner.abandon(execution.id()).await.unwrap();
    assert_eq!(finish(execution).await, Outcome::Lost);
    assert_nothing_left(&cluster).await;
}

/// A cluster whose pod logs do not separate the streams: with `Auto` the runner notices on
/// the first job and reads one combined stream, losing nothing. On that first job a
/// stderr line that came before the runner noticed may show on stderr too (the request
/// for stderr got the combined stream); from the second job on nothing is doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_without_split_log_streams_get_combined_output() {
    let Some(cluster) = cluster_with(|c| c.split_log_streams = false).await else {
        return;
    };
    let runner = runner_on(&cluster, |_| {}).await;
    let t = Target::shared(std::sync::Arc::new(OnCluster { runner, cluster })).with_image(IMAGE);
    for first in [true, false] {
        let j = job(vec![
            Step::run("echo out-1; echo err-1 >&2"),
            Step::run("echo out-2; exit 3"),
        ]);
        let r = run_job(&t, &j).await.unwrap();
        assert!(
            matches!(
                r.outcome,
                Outcome::Failed {
                    step: 1,
                    exit_code: 3,
                    ..
                }
            ),
            "{:?}",
            r.outcome
        );
        // One stream: each line once; across streams the cluster keeps no order.
        let text = r.stdout_text();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort();
        assert_eq!(lines, ["err-1", "out-1", "out-2"]);
        let stderr = r.stderr_text();
        if first {
            assert!(
                stderr.is_empty() || stderr == "err-1\n",
                "only a line of stderr before the runner noticed: {stderr:?}"
            );
        } else {
            assert_eq!(stderr, "");
        }
    }
}

/// `requests_per_second` bounds what the runner sends: at 2 per second, the ten requests
/// of connecting (namespace, nodes, the sweep's two lists, the watch's list and watch) and
/// of one job cannot all go out within four seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_request_rate_is_bounded() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let begun = std::time::Instant::now();
    let runner = runner_on(&cluster, |c| c.requests_per_second = 2).await;
    let outcome = runner
        .run_to_completion(&job(vec![Step::run("true")]))
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Succeeded);
    let sent = cluster.requests().len();
    assert!(
        sent >= 10,
        "only {sent} requests: {:#?}",
        cluster.requests()
    );
    let floor = Duration::from_secs(((sent as u64).div_ceil(2)).saturating_sub(1).min(4));
    assert!(
        begun.elapsed() >= floor,
        "{sent} requests went out in {:?} at 2 per second",
        begun.elapsed()
    );
    assert_nothing_left(&cluster).await;
}

/// A cancel stops the job for good: a step allowed to fail, or one that exits 0 on
/// SIGTERM, does not let the next step start, and the interrupted step is `Cancelled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_starts_no_further_step() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let runner = runner_on(&cluster, |_| {}).await;
    for first in [
        Step::run("echo started; sleep 300").allow_failure(),
        Step::run("trap 'exit 0' TERM; echo started; sleep 300 & wait"),
    ] {
        let j = job(vec![first, Step::run("echo never")]);
        let mut execution = runner.start(&j, JobId::new()).await.unwrap();
        let mut out = until_output(&mut execution, "started").await;
        execution.cancel();
        let mut events = Vec::new();
        let mut outcome = None;
        while let Some(event) = tokio::time::timeout(LIMIT, execution.next_event())
            .await
            .unwrap()
        {
            match event.kind {
                EventKind::Output { data, .. } => out.push_str(&String::from_utf8_lossy(&data)),
                EventKind::Finished { outcome: o } => outcome = Some(o),
                other => events.push(other),
            }
        }
        assert_eq!(outcome, Some(Outcome::Cancelled));
        assert!(!out.contains("never"), "{out}");
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, EventKind::StepStarted { step: 1, .. })),
            "{events:?}"
        );
        assert!(
            events.iter().any(|e| matches!(
                e,
                EventKind::StepFinished {
                    step: 0,
                    status: rustci_runners::StepStatus::Cancelled,
                    ..
                }
            )),
            "{events:?}"
        );
        assert_nothing_left(&cluster).await;
    }
}

/// A second start under the id of a running execution is refused before anything is
/// created, and the running one goes on undisturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_execution_id_is_refused() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let runner = runner_on(&cluster, |_| {}).await;
    let id = JobId::new();
    let j = job(vec![Step::run(FILLER_AFTER("echo started"))]);
    let mut execution = runner.start(&j, id.clone()).await.unwrap();
    let mut out = until_output(&mut execution, "started").await;
    cluster.reset_requests();
    let e = runner.start(&j, id).await.unwrap_err().to_string();
    assert!(e.contains("already running"), "{e}");
    // Nothing was created or changed for it. (The running execution may still be opening
    // its second log stream, a GET of its own pod's log, meanwhile.)
    let writes: Vec<_> = cluster
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET" || !r.path.ends_with("/log"))
        .collect();
    assert!(writes.is_empty(), "{writes:#?}");
    assert_eq!(runner.running(), 1);
    assert_eq!(cluster.pods(NAMESPACE).len(), 1);
    // Still running: it ends by its own cancel, not as lost.
    execution.cancel();
    assert_eq!(
        read_rest(&mut execution, &mut out).await,
        Outcome::Cancelled
    );
    assert!(out.starts_with("started\n"), "{out}");
    assert_nothing_left(&cluster).await;
}
