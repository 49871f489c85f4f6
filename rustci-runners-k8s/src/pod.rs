//! The objects one job becomes: a Pod running the entry script, and a Secret holding the
//! job's secrets (referenced by the pod, never written into its spec).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Secret};
use rustci_runners::job::Job;
use rustci_runners::{Error, JobId};
use serde_json::{Value, json};

use crate::config::{KubernetesConfig, PodPatch, WorkspaceVolume};
use crate::quantity::{cpu_quantity, validate_quantity};
use crate::script::entry_script;
use rustci_runners::backend::{
    LABEL_JOB, LABEL_MANAGED, LABEL_RUNNER, LABEL_RUNNER_NAME, WORKSPACE,
};

/// Annotation: the process that owns the object (`host/pid/start`); the key every backend
/// uses for the owner ([`rustci_runners::backend::LABEL_OWNER`]).
pub const ANNOTATION_OWNER: &str = rustci_runners::backend::LABEL_OWNER;
/// Annotation: the runner's name exactly as given (the label holds a label-safe form).
pub const ANNOTATION_RUNNER_NAME: &str = "rustci.runner-name";
/// Annotation: the execution id exactly as given.
pub const ANNOTATION_JOB_ID: &str = "rustci.job-id";
/// Name of the job container in every pod.
pub const CONTAINER: &str = "job";

/// Largest entry script (all steps together): it is one argument of `/bin/sh -c`, and
/// Linux takes at most 128 KiB in one argument.
pub const MAX_SCRIPT_BYTES: usize = 120 << 10;

/// Who is creating the objects.
pub(crate) struct Owner<'a> {
    pub runner_id: &'a str,
    pub runner_name: &'a str,
    pub owner: &'a str,
    pub namespace: &'a str,
}

/// A job's objects, ready to create.
pub(crate) struct JobObjects {
    pub pod: Pod,
    pub secret: Option<Secret>,
    pub name: String,
    pub nonce: String,
}

/// A value made safe for a label: `[a-z0-9.-_]`, at most 63, alphanumeric at both ends.
pub(crate) fn label_safe(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    while out.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        out.pop();
    }
    while out.starts_with(|c: char| !c.is_ascii_alphanumeric()) {
        out.remove(0);
    }
    if out.is_empty() { "x".into() } else { out }
}

/// The pod (and secret) name of execution `id`: `rustci-<id>` when the id is name-safe,
/// else a safe form plus a hash of the id so that different ids never share a name.
pub(crate) fn object_name(id: &JobId) -> String {
    let raw = id.as_str();
    let safe: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let safe = safe.trim_matches('-');
    if safe == raw && !safe.is_empty() {
        format!("rustci-{safe}")
    } else {
        // FNV-1a: stable across builds and platforms.
        let mut hash: u64 = 0xcbf29ce484222325;
        for b in raw.bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x100000001b3);
        }
        format!("rustci-{safe}-{hash:016x}")
            .replace("--", "-")
            .trim_matches('-')
            .to_string()
    }
}

/// The labels every object of job `id` carries.
pub(crate) fn labels(owner: &Owner<'_>, id: &JobId) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED.to_string(), "true".to_string()),
        (LABEL_JOB.to_string(), label_safe(id.as_str())),
        (LABEL_RUNNER.to_string(), label_safe(owner.runner_id)),
        (LABEL_RUNNER_NAME.to_string(), label_safe(owner.runner_name)),
    ])
}

/// Builds the pod and secret of `job`, `image` already decided, the patch applied and the
/// result checked. Errors name what is wrong; nothing has been sent to the cluster yet.
pub(crate) fn build(
    config: &KubernetesConfig,
    owner: &Owner<'_>,
    job: &Job,
    image: &str,
    id: &JobId,
) -> Result<JobObjects, Error> {
    let name = object_name(id);
    let nonce = JobId::new().as_str().to_string();
    let shared_workspace = matches!(
        config.pod.workspace,
        WorkspaceVolume::PersistentVolumeClaim { .. }
    );
    let script = entry_script(job, &nonce, shared_workspace);
    if script.len() > MAX_SCRIPT_BYTES {
        return Err(Error::Unsupported {
            runner: owner.runner_name.to_string(),
            reasons: vec![format!(
                "the job's steps take {} KiB of script; a job pod runs at most {} KiB",
                script.len() >> 10,
                MAX_SCRIPT_BYTES >> 10
            )],
        });
    }
    let mut labels_map = config.pod.labels.clone();
    labels_map.extend(labels(owner, id));
    let mut annotations = config.pod.annotations.clone();
    annotations.insert(ANNOTATION_OWNER.into(), owner.owner.to_string());
    annotations.insert(ANNOTATION_JOB_ID.into(), id.to_string());
    annotations.insert(ANNOTATION_RUNNER_NAME.into(), owner.runner_name.to_string());
    annotations.insert("rustci.job-name".into(), job.name.clone());

    // Environment: the runner's variables, the job's, then each secret from the Secret.
    let mut env: Vec<Value> = vec![
        json!({"name": "CI", "value": "true"}),
        json!({"name": "RUSTCI", "value": "true"}),
        json!({"name": "RUSTCI_JOB_ID", "value": id.as_str()}),
        json!({"name": "RUSTCI_JOB_NAME", "value": job.name}),
        json!({"name": "RUSTCI_RUNNER", "value": owner.runner_name}),
        json!({"name": "RUSTCI_WORKSPACE", "value": WORKSPACE}),
    ];
    for (k, v) in &job.env {
        env.push(json!({"name": k, "value": v}));
    }
    for k in job.secrets.keys() {
        env.push(json!({
            "name": k,
            "valueFrom": {"secretKeyRef": {"name": name, "key": k}}
        }));
    }

    let mut requests: BTreeMap<String, String> = config.pod.requests.clone();
    let mut limits: BTreeMap<String, String> = config.pod.limits.clone();
    if let Some(cpus) = job.resources.cpus {
        let q = cpu_quantity(cpus);
        requests.insert("cpu".into(), q.clone());
        limits.insert("cpu".into(), q);
    }
    if let Some(memory) = job.resources.memory {
        requests.insert("memory".into(), memory.to_string());
        limits.insert("memory".into(), memory.to_string());
    }
    let mut resources = serde_json::Map::new();
    if !requests.is_empty() {
        resources.insert("requests".into(), json!(requests));
    }
    if !limits.is_empty() {
        resources.insert("limits".into(), json!(limits));
    }

    let sec = &config.pod.security;
    let mut container_security = json!({
        "allowPrivilegeEscalation": sec.allow_privilege_escalation,
        "readOnlyRootFilesystem": sec.read_only_root_filesystem,
    });
    if !sec.drop_capabilities.is_empty() {
        container_security["capabilities"] = json!({"drop": sec.drop_capabilities});
    }
    let mut pod_security = serde_json::Map::new();
    if let Some(v) = sec.run_as_non_root {
        pod_security.insert("runAsNonRoot".into(), json!(v));
    }
    if let Some(v) = sec.run_as_user {
        pod_security.insert("runAsUser".into(), json!(v));
    }
    if let Some(v) = sec.run_as_group {
        pod_security.insert("runAsGroup".into(), json!(v));
    }
    if let Some(v) = sec.fs_group {
        pod_security.insert("fsGroup".into(), json!(v));
    }

    let (volume, mount) = match &config.pod.workspace {
        WorkspaceVolume::EmptyDir { memory, size_limit } => {
            let mut dir = serde_json::Map::new();
            if *memory {
                dir.insert("medium".into(), json!("Memory"));
            }
            if let Some(s) = size_limit {
                dir.insert("sizeLimit".into(), json!(s));
            }
            (
                json!({"name": "workspace", "emptyDir": dir}),
                json!({"name": "workspace", "mountPath": WORKSPACE}),
            )
        }
        WorkspaceVolume::PersistentVolumeClaim { claim_name } => (
            json!({"name": "workspace", "persistentVolumeClaim": {"claimName": claim_name}}),
            json!({"name": "workspace", "mountPath": WORKSPACE, "subPath": name}),
        ),
    };

    let mut container = json!({
        "name": CONTAINER,
        "image": image,
        "command": ["/bin/sh", "-c", script],
        "workingDir": WORKSPACE,
        "env": env,
        "resources": resources,
        "securityContext": container_security,
        "volumeMounts": [mount],
    });
    if let Some(p) = config.pod.image_pull_policy {
        container["imagePullPolicy"] = json!(crate::config::pull_policy_name(p));
    }

    let grace = config.termination_grace.as_secs();
    let deadline = job
        .effective_timeout()
        .saturating_add(config.termination_grace)
        .saturating_add(config.deadline_margin)
        .as_secs_f64()
        .ceil() as u64;
    let mut spec = json!({
        "restartPolicy": "Never",
        "enableServiceLinks": false,
        "automountServiceAccountToken": config.pod.automount_service_account_token,
        "terminationGracePeriodSeconds": grace,
        "activeDeadlineSeconds": deadline.max(1),
        "containers": [container],
        "volumes": [volume],
    });
    if !pod_security.is_empty() {
        spec["securityContext"] = Value::Object(pod_security);
    }
    if let Some(sa) = &config.pod.service_account {
        spec["serviceAccountName"] = json!(sa);
    }
    if !config.pod.node_selector.is_empty() {
        spec["nodeSelector"] = json!(config.pod.node_selector);
    }
    if !config.pod.tolerations.is_empty() {
        spec["tolerations"] = serde_json::to_value(&config.pod.tolerations)
            .map_err(|e| Error::invalid_config("pod.tolerations").caused_by(e))?;
    }
    if let Some(a) = &config.pod.affinity {
        spec["affinity"] = serde_json::to_value(a)
            .map_err(|e| Error::invalid_config("pod.affinity").caused_by(e))?;
    }
    if !config.pod.image_pull_secrets.is_empty() {
        spec["imagePullSecrets"] = config
            .pod
            .image_pull_secrets
            .iter()
            .map(|n| json!({"name": n}))
            .collect();
    }
    if let Some(patch) = &config.pod.patch {
        apply_patch(&mut spec, patch)?;
    }
    let pod_json = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": labels_map,
            "annotations": annotations,
        },
        "spec": spec,
    });
    let pod: Pod = serde_json::from_value(pod_json).map_err(|e| {
        Error::invalid_config("pod.patch: the patched pod is not a valid Pod").caused_by(e)
    })?;
    check_pod(&pod)?;

    let secret = (!job.secrets.is_empty())
        .then(|| {
            serde_json::from_value::<Secret>(json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {
                    "name": name,
                    "namespace": owner.namespace,
                    "labels": labels(owner, id),
                    "annotations": {
                        ANNOTATION_OWNER: owner.owner,
                        ANNOTATION_JOB_ID: id.as_str(),
                        ANNOTATION_RUNNER_NAME: owner.runner_name,
                    },
                },
                "stringData": job.secrets,
            }))
        })
        .transpose()
        .map_err(|e| Error::invalid_config("cannot build the job's Secret").caused_by(e))?;
    Ok(JobObjects {
        pod,
        secret,
        name,
        nonce,
    })
}

/// What the runner relies on after the patch: one job container running the entry script,
/// and quantities the API server will accept.
fn check_pod(pod: &Pod) -> Result<(), Error> {
    let bad = |why: String| Err(Error::invalid_config(format!("pod.patch: {why}")));
    let Some(spec) = &pod.spec else {
        return bad("the patch removed the pod spec".into());
    };
    let Some(job) = spec.containers.iter().find(|c| c.name == CONTAINER) else {
        return bad(format!("the patch removed the {CONTAINER:?} container"));
    };
    if job
        .command
        .as_ref()
        .and_then(|c| c.first())
        .map(String::as_str)
        != Some("/bin/sh")
    {
        return bad(format!(
            "the patch changed the command of the {CONTAINER:?} container, which runs the steps"
        ));
    }
    if spec.restart_policy.as_deref() != Some("Never") {
        return bad("restartPolicy must stay Never: a step must not run twice".into());
    }
    for (i, c) in spec.containers.iter().enumerate() {
        if let Some(r) = &c.resources {
            for (kind, map) in [("requests", &r.requests), ("limits", &r.limits)] {
                for (k, q) in map.iter().flatten() {
                    if let Err(e) = validate_quantity(&q.0) {
                        return bad(format!("spec.containers[{i}].resources.{kind}.{k}: {e}"));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Applies `patch` to a `PodSpec` in JSON form.
pub(crate) fn apply_patch(spec: &mut Value, patch: &PodPatch) -> Result<(), Error> {
    match patch {
        PodPatch::Merge(p) => {
            json_patch::merge(spec, p);
            Ok(())
        }
        PodPatch::Json(ops) => {
            let ops: json_patch::Patch = serde_json::from_value(ops.clone()).map_err(|e| {
                Error::invalid_config("pod.patch: not a JSON patch (RFC 6902)").caused_by(e)
            })?;
            json_patch::patch(spec, &ops)
                .map_err(|e| Error::invalid_config("pod.patch does not apply").caused_by(e))
        }
        PodPatch::Strategic(p) => strategic_merge(spec, p)
            .map_err(|e| Error::invalid_config("pod.patch does not apply").caused_by(e)),
    }
}

/// A strategic merge: objects merge key by key (`null` removes), lists of objects merge by
/// their Kubernetes merge key (`name`; `mountPath` for `volumeMounts`, `devicePath` for
/// `volumeDevices`, `containerPort` for `ports`) and `"$patch": "delete"` removes one;
/// other lists are replaced.
fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), String> {
    merge_field(target, patch, "")
}

fn merge_key(field: &str) -> &'static str {
    match field {
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" => "containerPort",
        _ => "name",
    }
}

fn merge_field(target: &mut Value, patch: &Value, field: &str) -> Result<(), String> {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, pv) in p {
                if pv.is_null() {
                    t.remove(k);
                } else if let Some(tv) = t.get_mut(k) {
                    merge_field(tv, pv, k).map_err(|e| format!("{k}: {e}"))?;
                } else {
                    let mut v = Value::Null;
                    merge_field(&mut v, pv, k).map_err(|e| format!("{k}: {e}"))?;
                    t.insert(k.clone(), v);
                }
            }
            Ok(())
        }
        (Value::Array(t), Value::Array(p))
            if keyed_list(t, merge_key(field)) && keyed_list(p, merge_key(field)) =>
        {
            let key = merge_key(field);
            for item in p {
                let id = item[key].clone();
                let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                let pos = t.iter().position(|x| x[key] == id);
                match (pos, delete) {
                    (Some(i), true) => {
                        t.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => merge_field(&mut t[i], item, "")?,
                    (None, false) => t.push(without_directives(item)),
                }
            }
            Ok(())
        }
        (t, p) => {
            if p.get("$patch").is_some() {
                return Err("a \"$patch\" directive outside a list of keyed objects".into());
            }
            *t = without_directives(p);
            Ok(())
        }
    }
}

fn keyed_list(items: &[Value], key: &str) -> bool {
    items
        .iter()
        .all(|x| x.get(key).is_some_and(|v| !v.is_null()))
}

fn without_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "$patch")
                .map(|(k, v)| (k.clone(), without_directives(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustci_runners::Step;

    fn owner() -> Owner<'static> {
        Owner {
            runner_id: "r-1",
            runner_name: "k8s",
            owner: "host/1/2",
            namespace: "ci",
        }
    }

    fn job() -> Job {
        Job::new("build", vec![Step::run("echo hi")])
            .with_env("APP", "demo")
            .with_secret("TOKEN", "s3cr3t-value")
    }

    #[test]
    fn secrets_go_to_the_secret_never_the_pod() {
        let config = KubernetesConfig::default();
        let id = JobId::from("abc123".to_string());
        let objects = build(&config, &owner(), &job(), "img:1", &id).unwrap();
        let pod_text = serde_json::to_string(&objects.pod).unwrap();
        assert!(!pod_text.contains("s3cr3t-value"), "{pod_text}");
        assert!(pod_text.contains("secretKeyRef"));
        let secret = objects.secret.unwrap();
        assert_eq!(
            secret.string_data.unwrap().get("TOKEN").map(String::as_str),
            Some("s3cr3t-value")
        );
        assert_eq!(objects.name, "rustci-abc123");
        let labels = objects.pod.metadata.labels.unwrap();
        assert_eq!(labels[LABEL_JOB], "abc123");
        assert_eq!(labels[LABEL_RUNNER_NAME], "k8s");
    }

    #[test]
    fn options_and_resources_reach_the_spec() {
        let mut config = KubernetesConfig::default();
        config.pod.node_selector.insert("disk".into(), "ssd".into());
        config.pod.service_account = Some("ci".into());
        config.pod.image_pull_secrets = vec!["regcred".into()];
        config.pod.security.run_as_user = Some(1000);
        config.pod.security.fs_group = Some(2000);
        config.pod.security.read_only_root_filesystem = true;
        config
            .pod
            .limits
            .insert("ephemeral-storage".into(), "1Gi".into());
        let mut j = job();
        j.resources.cpus = Some(1.5);
        j.resources.memory = Some(256 << 20);
        let objects = build(&config, &owner(), &j, "img", &JobId::new()).unwrap();
        let spec = objects.pod.spec.unwrap();
        assert_eq!(spec.node_selector.unwrap()["disk"], "ssd");
        assert_eq!(spec.service_account_name.as_deref(), Some("ci"));
        assert_eq!(spec.image_pull_secrets.unwrap()[0].name, "regcred");
        let psc = spec.security_context.unwrap();
        assert_eq!((psc.run_as_user, psc.fs_group), (Some(1000), Some(2000)));
        assert_eq!(spec.active_deadline_seconds, Some(3600 + 10 + 60));
        let c = &spec.containers[0];
        let r = c.resources.as_ref().unwrap();
        assert_eq!(r.limits.as_ref().unwrap()["cpu"].0, "1500m");
        assert_eq!(r.requests.as_ref().unwrap()["memory"].0, "268435456");
        assert_eq!(r.limits.as_ref().unwrap()["ephemeral-storage"].0, "1Gi");
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
    }

    #[test]
    fn patches_of_each_kind() {
        let mut config = KubernetesConfig::default();
        config.pod.patch = Some(PodPatch::Strategic(json!({
            "containers": [{"name": "job", "env": [{"name": "EXTRA", "value": "1"}]},
                           {"name": "sidecar", "image": "side:1"}],
            "hostname": "ci"
        })));
        let pod = build(&config, &owner(), &job(), "img", &JobId::new())
            .unwrap()
            .pod;
        let spec = pod.spec.unwrap();
        assert_eq!(spec.containers.len(), 2);
        let env = spec.containers[0].env.as_ref().unwrap();
        assert!(env.iter().any(|e| e.name == "EXTRA"));
        assert!(
            env.iter().any(|e| e.name == "RUSTCI_JOB_ID"),
            "merged, not replaced"
        );
        assert_eq!(spec.hostname.as_deref(), Some("ci"));

        // Volume mounts merge by mountPath, not by name.
        config.pod.patch = Some(PodPatch::Strategic(json!({
            "containers": [{"name": "job", "volumeMounts": [
                {"name": "cache", "mountPath": "/cache"},
                {"name": "workspace", "mountPath": "/workspace", "readOnly": true}
            ]}],
            "volumes": [{"name": "cache", "emptyDir": {}}]
        })));
        let spec = build(&config, &owner(), &job(), "img", &JobId::new())
            .unwrap()
            .pod
            .spec
            .unwrap();
        let mounts = spec.containers[0].volume_mounts.as_ref().unwrap();
        assert_eq!(mounts.len(), 2, "{mounts:?}");
        assert_eq!(mounts[0].mount_path, "/workspace");
        assert_eq!(mounts[0].read_only, Some(true));
        assert_eq!(spec.volumes.as_ref().unwrap().len(), 2);

        config.pod.patch = Some(PodPatch::Merge(json!({"activeDeadlineSeconds": 5})));
        let pod = build(&config, &owner(), &job(), "img", &JobId::new())
            .unwrap()
            .pod;
        assert_eq!(pod.spec.unwrap().active_deadline_seconds, Some(5));

        config.pod.patch = Some(PodPatch::Json(json!([
            {"op": "add", "path": "/priorityClassName", "value": "high"}
        ])));
        let pod = build(&config, &owner(), &job(), "img", &JobId::new())
            .unwrap()
            .pod;
        assert_eq!(
            pod.spec.unwrap().priority_class_name.as_deref(),
            Some("high")
        );
    }

    #[test]
    fn patches_that_do_not_apply_are_clear_errors() {
        let cases = [
            (
                PodPatch::Json(json!([{"op": "replace", "path": "/nope/0", "value": 1}])),
                "does not apply",
            ),
            (PodPatch::Json(json!({"op": "add"})), "not a JSON patch"),
            (
                PodPatch::Merge(json!({"containers": [{"name": "other", "image": "x"}]})),
                "removed the \"job\" container",
            ),
            (
                PodPatch::Merge(json!({"restartPolicy": "Always"})),
                "restartPolicy",
            ),
            (
                PodPatch::Merge(json!({"activeDeadlineSeconds": "soon"})),
                "not a valid Pod",
            ),
            (
                PodPatch::Strategic(
                    json!({"containers": [{"name": "job", "resources": {"limits": {"cpu": "lots"}}}]}),
                ),
                "spec.containers[0].resources.limits.cpu",
            ),
        ];
        for (patch, expected) in cases {
            let mut config = KubernetesConfig::default();
            config.pod.patch = Some(patch.clone());
            let e = build(&config, &owner(), &job(), "img", &JobId::new())
                .err()
                .unwrap_or_else(|| panic!("{patch:?} was accepted"))
                .to_string();
            assert!(e.contains(expected), "{patch:?}: {e}");
        }
    }

    #[test]
    fn names_are_safe_and_distinct() {
        let a = object_name(&JobId::from("Job_1".to_string()));
        let b = object_name(&JobId::from("job-1".to_string()));
        assert_ne!(a, b);
        assert!(crate::config::is_dns_subdomain(&a), "{a}");
        assert_eq!(b, "rustci-job-1");
        assert_eq!(label_safe("--A b--"), "a-b");
    }
}
