//! API errors as the real API server words them: `Status` objects with reason, details and
//! the HTTP code.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    ListMeta, Status, StatusCause, StatusDetails,
};

/// An error answer of the API: turned into a `Status` body with `code` as HTTP status.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// Machine-readable reason (`NotFound`, `AlreadyExists`, `Invalid`, ...).
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
    /// Optional details (name, kind, causes).
    pub details: Option<Box<StatusDetails>>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String) -> Self {
        ApiError {
            code,
            reason,
            message,
            details: None,
        }
    }

    fn with_details(mut self, name: &str, kind: &str) -> Self {
        self.details = Some(Box::new(StatusDetails {
            name: (!name.is_empty()).then(|| name.to_string()),
            kind: Some(kind.to_string()),
            ..Default::default()
        }));
        self
    }

    /// 404 `pods "x" not found`.
    pub(crate) fn not_found(resource: &str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{resource} \"{name}\" not found"))
            .with_details(name, resource)
    }

    /// 404 for a path the server does not serve.
    pub(crate) fn no_route() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
        )
    }

    /// 405 for a method the resource does not support.
    pub(crate) fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }

    /// 409 `pods "x" already exists`.
    pub(crate) fn already_exists(resource: &str, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{resource} \"{name}\" already exists"),
        )
        .with_details(name, resource)
    }

    /// 409 Conflict.
    pub(crate) fn conflict(resource: &str, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {resource} \"{name}\": {why}"),
        )
        .with_details(name, resource)
    }

    /// 400 BadRequest.
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message.into())
    }

    /// 401 Unauthorized.
    pub(crate) fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized".into())
    }

    /// 403 in RBAC's words. `namespace` empty = cluster scope.
    pub(crate) fn forbidden(verb: &str, resource: &str, name: &str, namespace: &str) -> Self {
        let (plural, sub) = match resource.split_once('/') {
            Some((p, _)) => (p, true),
            None => (resource, false),
        };
        let subject = if name.is_empty() || (!sub && verb == "create") {
            plural.to_string()
        } else {
            format!("{plural} \"{name}\"")
        };
        let scope = if namespace.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace \"{namespace}\"")
        };
        Self::new(
            403,
            "Forbidden",
            format!(
                "{subject} is forbidden: User \"rustci\" cannot {verb} resource \"{resource}\" in API group \"\" {scope}"
            ),
        )
        .with_details(name, plural)
    }

    /// 422 Invalid with one cause per field error.
    pub(crate) fn invalid(kind: &str, name: &str, resource: &str, causes: Vec<FieldError>) -> Self {
        let listed: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let joined = if listed.len() == 1 {
            listed[0].clone()
        } else {
            format!("[{}]", listed.join(", "))
        };
        let mut e = Self::new(
            422,
            "Invalid",
            format!("{kind} \"{name}\" is invalid: {joined}"),
        )
        .with_details(name, resource);
        if let Some(d) = e.details.as_mut() {
            d.causes = Some(
                causes
                    .into_iter()
                    .map(|c| StatusCause {
                        field: Some(c.field),
                        message: Some(c.message),
                        reason: Some(c.reason.to_string()),
                    })
                    .collect(),
            );
        }
        e
    }

    /// 410 Expired `too old resource version: X (Y)`.
    pub(crate) fn expired(requested: u64, oldest: u64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    /// An injected failure with the reason that belongs to `code`.
    pub(crate) fn injected(code: u16, resource: &str, name: &str) -> Self {
        let (reason, message) = match code {
            400 => ("BadRequest", "injected bad request".to_string()),
            401 => ("Unauthorized", "Unauthorized".to_string()),
            404 => ("NotFound", format!("{resource} \"{name}\" not found")),
            409 => (
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {resource} \"{name}\": injected conflict"
                ),
            ),
            410 => (
                "Expired",
                "injected: the resource version is too old".to_string(),
            ),
            422 => ("Invalid", "injected: the object is invalid".to_string()),
            429 => (
                "TooManyRequests",
                "the server has received too many requests and has asked us to try again later"
                    .to_string(),
            ),
            500 => (
                "InternalError",
                "Internal error occurred: injected failure".to_string(),
            ),
            503 => (
                "ServiceUnavailable",
                "the server is currently unable to handle the request".to_string(),
            ),
            504 => (
                "Timeout",
                "the server was unable to return a response in the time allotted".to_string(),
            ),
            _ => ("", format!("injected failure with status {code}")),
        };
        Self::new(code, reason, message).with_details(name, resource)
    }

    /// The `Status` body.
    pub(crate) fn status(&self) -> Status {
        Status {
            code: Some(i32::from(self.code)),
            details: self.details.as_deref().cloned(),
            message: Some(self.message.clone()),
            metadata: ListMeta::default(),
            reason: (!self.reason.is_empty()).then(|| self.reason.to_string()),
            status: Some("Failure".into()),
        }
    }
}

/// One field error of a 422 answer.
#[derive(Debug, Clone)]
pub(crate) struct FieldError {
    /// Field path, e.g. `spec.containers[0].image`.
    pub field: String,
    /// `FieldValueRequired`, `FieldValueInvalid`, ...
    pub reason: &'static str,
    /// The message as the API server words it, e.g. `Required value`.
    pub message: String,
}

impl FieldError {
    /// `Required value`.
    pub(crate) fn required(field: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: "FieldValueRequired",
            message: "Required value".into(),
        }
    }

    /// `Required value: detail`.
    pub(crate) fn required_because(field: impl Into<String>, detail: &str) -> Self {
        FieldError {
            field: field.into(),
            reason: "FieldValueRequired",
            message: format!("Required value: {detail}"),
        }
    }

    /// `Invalid value: "v": detail`.
    pub(crate) fn invalid(field: impl Into<String>, value: &str, detail: &str) -> Self {
        FieldError {
            field: field.into(),
            reason: "FieldValueInvalid",
            message: format!("Invalid value: {}: {detail}", quote(value)),
        }
    }

    /// `Duplicate value: "v"`.
    pub(crate) fn duplicate(field: impl Into<String>, value: &str) -> Self {
        FieldError {
            field: field.into(),
            reason: "FieldValueDuplicate",
            message: format!("Duplicate value: {}", quote(value)),
        }
    }

    /// `Not found: "v"`.
    pub(crate) fn not_found(field: impl Into<String>, value: &str) -> Self {
        FieldError {
            field: field.into(),
            reason: "FieldValueNotFound",
            message: format!("Not found: {}", quote(value)),
        }
    }

    /// `Unsupported value: "v": supported values: "a", "b"`.
    pub(crate) fn not_supported(field: impl Into<String>, value: &str, supported: &[&str]) -> Self {
        let list: Vec<String> = supported.iter().map(|s| quote(s)).collect();
        FieldError {
            field: field.into(),
            reason: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: {}: supported values: {}",
                quote(value),
                list.join(", ")
            ),
        }
    }
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}
