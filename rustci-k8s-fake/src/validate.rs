//! Validation and defaulting of created objects, in the API server's words.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, Secret, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::quantity::{self, QUANTITY_REGEX};
use crate::status::FieldError;

const DNS1123_SUBDOMAIN: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1123_LABEL: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const ENV_NAME: &str = "a valid environment variable name must consist only of printable ASCII characters other than '='";
const CONFIG_KEY: &str = "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')";

fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// DNS-1123 subdomain: dot-separated labels, at most 253 characters.
pub(crate) fn is_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_label)
}

fn name_errors(field: &str, name: &str, out: &mut Vec<FieldError>) {
    if name.len() > 253 {
        out.push(FieldError::invalid(
            field,
            name,
            "must be no more than 253 characters",
        ));
    } else if !is_subdomain(name) {
        out.push(FieldError::invalid(field, name, DNS1123_SUBDOMAIN));
    }
}

fn label_errors(labels: &BTreeMap<String, String>, out: &mut Vec<FieldError>) {
    for (k, v) in labels {
        let (prefix, name) = match k.rsplit_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, k.as_str()),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !name_ok || prefix.is_some_and(|p| !is_subdomain(p)) {
            out.push(FieldError::invalid(
                "metadata.labels",
                k,
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')",
            ));
        }
        let value_ok = v.len() <= 63
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && (v.is_empty()
                || (v.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && v.ends_with(|c: char| c.is_ascii_alphanumeric())));
        if !value_ok {
            out.push(FieldError::invalid(
                format!("metadata.labels[{k}]"),
                v,
                "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')",
            ));
        }
    }
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (32..=126).contains(&b) && b != b'=')
}

/// Whether `image` is a syntactically valid image reference.
pub(crate) fn is_image_reference(image: &str) -> bool {
    if image.is_empty() || image.trim() != image {
        return false;
    }
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        let Some((alg, hex)) = d.split_once(':') else {
            return false;
        };
        if alg.is_empty() || hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return false;
        }
    }
    let (path, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if let Some(tag) = tag {
        let ok = !tag.is_empty()
            && tag.len() <= 128
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            && !tag.starts_with(['.', '-']);
        if !ok {
            return false;
        }
    }
    if path.is_empty() {
        return false;
    }
    let mut components: Vec<&str> = path.split('/').collect();
    // A first component with '.', ':' or "localhost" is a registry host (may hold a port
    // and upper case).
    if components.len() > 1 {
        let host = components[0];
        if host.contains('.') || host.contains(':') || host == "localhost" {
            if !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
            {
                return false;
            }
            components.remove(0);
        }
    }
    components.iter().all(|c| {
        !c.is_empty()
            && c.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            })
            && c.starts_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit())
            && c.ends_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit())
    })
}

fn standard_resource(name: &str) -> bool {
    matches!(name, "cpu" | "memory" | "ephemeral-storage")
        || name.starts_with("hugepages-")
        || name.contains('/')
}

fn resource_errors(path: &str, c: &Container, out: &mut Vec<FieldError>) {
    let Some(res) = &c.resources else { return };
    let mut parse_map = |which: &str, map: &Option<BTreeMap<String, Quantity>>| {
        let mut parsed = BTreeMap::new();
        for (name, q) in map.iter().flatten() {
            let field = format!("{path}.resources.{which}.{name}");
            if !standard_resource(name) {
                out.push(FieldError::invalid(
                    format!("{path}.resources.{which}[{name}]"),
                    name,
                    "must be a standard resource type or fully qualified",
                ));
                continue;
            }
            match quantity::parse(&q.0) {
                None => out.push(FieldError::invalid(
                    field,
                    &q.0,
                    &format!("quantities must match the regular expression '{QUANTITY_REGEX}'"),
                )),
                Some(v) if v < 0.0 => out.push(FieldError::invalid(
                    field,
                    &q.0,
                    "must be greater than or equal to 0",
                )),
                Some(v) => {
                    parsed.insert(name.clone(), (v, q.0.clone()));
                }
            }
        }
        parsed
    };
    let limits = parse_map("limits", &res.limits);
    let requests = parse_map("requests", &res.requests);
    for (name, (value, text)) in &requests {
        if let Some((limit, limit_text)) = limits.get(name)
            && value > limit
        {
            out.push(FieldError::invalid(
                format!("{path}.resources.requests"),
                text,
                &format!("must be less than or equal to {name} limit of {limit_text}"),
            ));
        }
    }
}

fn container_errors(
    path: &str,
    c: &Container,
    volumes: &BTreeSet<String>,
    out: &mut Vec<FieldError>,
) {
    if c.name.is_empty() {
        out.push(FieldError::required(format!("{path}.name")));
    } else if !is_label(&c.name) {
        out.push(FieldError::invalid(
            format!("{path}.name"),
            &c.name,
            DNS1123_LABEL,
        ));
    }
    match c.image.as_deref() {
        None | Some("") => out.push(FieldError::required(format!("{path}.image"))),
        Some(i) if i.trim() != i => out.push(FieldError::invalid(
            format!("{path}.image"),
            i,
            "must not have leading or trailing whitespace",
        )),
        _ => {}
    }
    if let Some(p) = c.image_pull_policy.as_deref()
        && !matches!(p, "Always" | "IfNotPresent" | "Never")
    {
        out.push(FieldError::not_supported(
            format!("{path}.imagePullPolicy"),
            p,
            &["Always", "IfNotPresent", "Never"],
        ));
    }
    for (i, e) in c.env.iter().flatten().enumerate() {
        let field = format!("{path}.env[{i}].name");
        if e.name.is_empty() {
            out.push(FieldError::required(field));
        } else if !is_env_name(&e.name) {
            out.push(FieldError::invalid(field, &e.name, ENV_NAME));
        }
        if e.value.as_deref().is_some_and(|v| !v.is_empty()) && e.value_from.is_some() {
            out.push(FieldError::invalid(
                format!("{path}.env[{i}].valueFrom"),
                "",
                "may not be specified when `value` is not empty",
            ));
        }
        if let Some(from) = &e.value_from {
            if let Some(r) = &from.secret_key_ref {
                if r.name.is_empty() {
                    out.push(FieldError::required(format!(
                        "{path}.env[{i}].valueFrom.secretKeyRef.name"
                    )));
                }
                if r.key.is_empty() {
                    out.push(FieldError::required(format!(
                        "{path}.env[{i}].valueFrom.secretKeyRef.key"
                    )));
                }
            }
            if let Some(f) = &from.field_ref {
                let supported = [
                    "metadata.name",
                    "metadata.namespace",
                    "metadata.uid",
                    "spec.nodeName",
                    "spec.serviceAccountName",
                    "status.hostIP",
                    "status.podIP",
                ];
                if !supported.contains(&f.field_path.as_str()) {
                    out.push(FieldError::not_supported(
                        format!("{path}.env[{i}].valueFrom.fieldRef.fieldPath"),
                        &f.field_path,
                        &supported,
                    ));
                }
            }
        }
    }
    resource_errors(path, c, out);
    let mut mount_paths = BTreeSet::new();
    for (i, m) in c.volume_mounts.iter().flatten().enumerate() {
        let field = format!("{path}.volumeMounts[{i}]");
        if m.name.is_empty() {
            out.push(FieldError::required(format!("{field}.name")));
        } else if !volumes.contains(&m.name) {
            out.push(FieldError::not_found(format!("{field}.name"), &m.name));
        }
        if m.mount_path.is_empty() {
            out.push(FieldError::required(format!("{field}.mountPath")));
        } else if !mount_paths.insert(m.mount_path.clone()) {
            out.push(FieldError::invalid(
                format!("{field}.mountPath"),
                &m.mount_path,
                "must be unique",
            ));
        }
        if let Some(sub) = m.sub_path.as_deref() {
            if sub.starts_with('/') {
                out.push(FieldError::invalid(
                    format!("{field}.subPath"),
                    sub,
                    "must be a relative path",
                ));
            } else if sub.split('/').any(|p| p == "..") {
                out.push(FieldError::invalid(
                    format!("{field}.subPath"),
                    sub,
                    "must not contain '..'",
                ));
            }
        }
    }
}

/// Validates a pod (after defaulting); every error found.
pub(crate) fn pod_errors(pod: &Pod) -> Vec<FieldError> {
    let mut out = Vec::new();
    let name = pod.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        out.push(FieldError::required_because(
            "metadata.name",
            "name or generateName is required",
        ));
    } else {
        name_errors("metadata.name", &name, &mut out);
    }
    label_errors(
        pod.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
        &mut out,
    );
    let Some(spec) = &pod.spec else {
        out.push(FieldError::required("spec.containers"));
        return out;
    };
    let mut volumes = BTreeSet::new();
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        let field = format!("spec.volumes[{i}].name");
        if v.name.is_empty() {
            out.push(FieldError::required(field));
        } else if !is_label(&v.name) {
            out.push(FieldError::invalid(field, &v.name, DNS1123_LABEL));
        } else if !volumes.insert(v.name.clone()) {
            out.push(FieldError::duplicate(field, &v.name));
        }
    }
    if spec.containers.is_empty() {
        out.push(FieldError::required("spec.containers"));
    }
    let mut names = BTreeSet::new();
    for (i, c) in spec.containers.iter().enumerate() {
        let path = format!("spec.containers[{i}]");
        if !c.name.is_empty() && !names.insert(c.name.clone()) {
            out.push(FieldError::duplicate(format!("{path}.name"), &c.name));
        }
        container_errors(&path, c, &volumes, &mut out);
    }
    if let Some(p) = spec.restart_policy.as_deref()
        && !matches!(p, "Always" | "OnFailure" | "Never")
    {
        out.push(FieldError::not_supported(
            "spec.restartPolicy",
            p,
            &["Always", "OnFailure", "Never"],
        ));
    }
    if let Some(d) = spec.active_deadline_seconds
        && d <= 0
    {
        out.push(FieldError::invalid(
            "spec.activeDeadlineSeconds",
            &d.to_string(),
            "must be between 1 and 2147483647, inclusive",
        ));
    }
    if let Some(g) = spec.termination_grace_period_seconds
        && g < 0
    {
        out.push(FieldError::invalid(
            "spec.terminationGracePeriodSeconds",
            &g.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    out
}

fn default_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') {
        return "IfNotPresent";
    }
    match last.split_once(':') {
        None => "Always",
        Some((_, "latest")) => "Always",
        Some(_) => "IfNotPresent",
    }
}

/// Applies the API server's defaults to a new pod's spec.
pub(crate) fn default_pod_spec(spec: &mut PodSpec) {
    spec.restart_policy.get_or_insert_with(|| "Always".into());
    spec.termination_grace_period_seconds.get_or_insert(30);
    spec.dns_policy.get_or_insert_with(|| "ClusterFirst".into());
    spec.scheduler_name
        .get_or_insert_with(|| "default-scheduler".into());
    spec.security_context.get_or_insert_with(Default::default);
    spec.enable_service_links.get_or_insert(true);
    spec.priority.get_or_insert(0);
    spec.preemption_policy
        .get_or_insert_with(|| "PreemptLowerPriority".into());
    spec.service_account_name
        .get_or_insert_with(|| "default".into());
    let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        if !tolerations.iter().any(|t| t.key.as_deref() == Some(key)) {
            tolerations.push(Toleration {
                key: Some(key.into()),
                operator: Some("Exists".into()),
                effect: Some("NoExecute".into()),
                toleration_seconds: Some(300),
                value: None,
            });
        }
    }
    for c in &mut spec.containers {
        if c.image_pull_policy.is_none() {
            c.image_pull_policy =
                Some(default_pull_policy(c.image.as_deref().unwrap_or("")).into());
        }
        c.termination_message_path
            .get_or_insert_with(|| "/dev/termination-log".into());
        c.termination_message_policy
            .get_or_insert_with(|| "File".into());
        let res = c.resources.get_or_insert_with(Default::default);
        if let Some(limits) = res.limits.clone() {
            let requests = res.requests.get_or_insert_with(BTreeMap::new);
            for (k, v) in limits {
                requests.entry(k).or_insert(v);
            }
        }
    }
}

/// The QoS class of a (defaulted) pod spec.
pub(crate) fn qos_class(spec: &PodSpec) -> &'static str {
    let mut any = false;
    let mut guaranteed = true;
    for c in &spec.containers {
        let res = c.resources.clone().unwrap_or_default();
        let limits = res.limits.unwrap_or_default();
        let requests = res.requests.unwrap_or_default();
        for name in ["cpu", "memory"] {
            let l = limits.get(name).and_then(|q| quantity::parse(&q.0));
            let r = requests.get(name).and_then(|q| quantity::parse(&q.0));
            if l.is_some() || r.is_some() {
                any = true;
            }
            if l.is_none() || l != r {
                guaranteed = false;
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// Validates a secret; every error found.
pub(crate) fn secret_errors(secret: &Secret) -> Vec<FieldError> {
    let mut out = Vec::new();
    let name = secret.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        out.push(FieldError::required_because(
            "metadata.name",
            "name or generateName is required",
        ));
    } else {
        name_errors("metadata.name", &name, &mut out);
    }
    label_errors(
        secret.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
        &mut out,
    );
    let keys = secret
        .data
        .iter()
        .flat_map(|d| d.keys().map(|k| ("data", k)))
        .chain(
            secret
                .string_data
                .iter()
                .flat_map(|d| d.keys().map(|k| ("stringData", k))),
        );
    for (field, key) in keys {
        let ok = !key.is_empty()
            && key.len() <= 253
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
            && key != "."
            && key != ".."
            && !key.starts_with("..");
        if !ok {
            out.push(FieldError::invalid(
                format!("{field}[{key}]"),
                key,
                CONFIG_KEY,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        for ok in [
            "rustci-busybox:local",
            "busybox",
            "docker.io/library/busybox:1.36",
            "localhost:5000/a/b:c",
            "Registry.Example.com/x",
            "a@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(is_image_reference(ok), "{ok}");
        }
        for bad in [
            "Not A Valid/Reference",
            "UPPER",
            "a:",
            ":tag",
            "a//b",
            " a",
            "a:b:c",
        ] {
            assert!(!is_image_reference(bad), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(is_subdomain("a.b-c"));
        assert!(!is_subdomain("A"));
        assert!(!is_subdomain("-a"));
        assert!(!is_subdomain(&"a".repeat(254)));
    }
}
