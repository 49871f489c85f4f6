//! Image references and the pull policy: which registry an image comes from, what a
//! valid reference is, and making sure the engine has the image before a job.

use bollard::query_parameters::CreateImageOptionsBuilder;
use futures::StreamExt;
use rustci_runners::{Error, PullPolicy};

use crate::runner::{Inner, engine_error, is_not_found};

/// The registry host of an image reference (`docker.io` when it names none).
pub(crate) fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first
        }
        _ => "docker.io",
    }
}

/// The reference with `:latest` added when it has neither tag nor digest.
pub(crate) fn with_default_tag(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        image.to_string()
    } else {
        format!("{image}:latest")
    }
}

/// Checks an image reference's syntax: `[registry/]name[:tag][@digest]`.
pub(crate) fn check_image_reference(image: &str) -> Result<(), String> {
    let bad = || format!("invalid image reference {image:?}");
    if image.is_empty()
        || image.len() > 512
        || image.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(bad());
    }
    let (name, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest
        && !d.split_once(':').is_some_and(|(algorithm, hex)| {
            !algorithm.is_empty()
                && algorithm.chars().all(|c| {
                    c.is_ascii_lowercase()
                        || c.is_ascii_digit()
                        || matches!(c, '+' | '.' | '_' | '-')
                })
                && hex.len() >= 32
                && hex
                    .chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, 'a'..='f'))
        })
    {
        return Err(bad());
    }
    let last = name.rsplit('/').next().unwrap_or(name);
    let (last_name, tag) = match last.split_once(':') {
        Some((n, t)) => (n, Some(t)),
        None => (last, None),
    };
    if let Some(t) = tag
        && (t.is_empty()
            || t.len() > 128
            || t.starts_with(['.', '-'])
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(bad());
    }
    let path_ok = |s: &str| {
        !s.is_empty()
            && s.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            })
            && !s.starts_with(['.', '_', '-'])
            && !s.ends_with(['.', '_', '-'])
            // Separators: one `.` or `_`, `__`, or any run of `-`; never mixed.
            && s.as_bytes().windows(2).all(|w| {
                let sep = |c: u8| matches!(c, b'.' | b'_' | b'-');
                !(sep(w[0]) && sep(w[1])) || (w[0] == w[1] && w[0] != b'.')
            })
    };
    let components: Vec<&str> = name.split('/').collect();
    for (i, c) in components.iter().enumerate() {
        let c = if i + 1 == components.len() {
            last_name
        } else {
            c
        };
        // The first component may be a registry host: letters, digits, dots and dashes,
        // with an optional port.
        let host_ok = |h: &str| {
            let (host, port) = h.split_once(':').unwrap_or((h, "0"));
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
                && !host.starts_with(['.', '-'])
                && !host.contains("..")
                && !port.is_empty()
                && port.len() <= 5
                && port.chars().all(|c| c.is_ascii_digit())
        };
        let registry = i == 0
            && components.len() > 1
            && (c.contains('.') || c.contains(':') || c == "localhost")
            && host_ok(c);
        if !(path_ok(c) || registry) {
            return Err(bad());
        }
    }
    Ok(())
}

impl Inner {
    pub(crate) async fn ensure_image(&self, image: &str) -> Result<(), Error> {
        let present = match self.docker.inspect_image(image).await {
            Ok(_) => true,
            Err(e) if is_not_found(&e) => false,
            Err(e) => return Err(engine_error(&format!("cannot inspect image {image}"), e)),
        };
        match (self.config.pull_policy, present) {
            (PullPolicy::Never, false) => Err(Error::rejected(format!(
                "image {image} is not on the engine and the pull policy is never"
            ))),
            (PullPolicy::Never, true) | (PullPolicy::IfNotPresent, true) => Ok(()),
            (PullPolicy::Always, _) | (PullPolicy::IfNotPresent, false) => {
                // Without a tag the engine would pull every tag of the repository.
                let reference = with_default_tag(image);
                let options = CreateImageOptionsBuilder::new()
                    .from_image(&reference)
                    .build();
                // Credentials go only to the registry they are for.
                let registry = registry_of(image);
                let credentials = self
                    .config
                    .registry_auth
                    .as_ref()
                    .filter(|a| {
                        a.server
                            .trim_start_matches("https://")
                            .trim_end_matches('/')
                            == registry
                    })
                    .map(|a| bollard::auth::DockerCredentials {
                        username: Some(a.username.clone()),
                        password: Some(a.password.clone()),
                        serveraddress: Some(a.server.clone()),
                        ..Default::default()
                    });
                let mut pull = self.docker.create_image(Some(options), None, credentials);
                while let Some(progress) = pull.next().await {
                    if let Err(e) = progress {
                        return Err(engine_error(&format!("cannot pull image {image}"), e));
                    }
                }
                Ok(())
            }
            (policy, _) => Err(Error::invalid_config(format!(
                "pull policy {} is not supported by this runner",
                policy.as_str()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_image_reference;

    #[test]
    pub(crate) fn image_references() {
        for ok in [
            "busybox",
            "rustci-busybox:local",
            "library/alpine:3.20",
            "registry.example.com:5000/team/app:1.2.3",
            "localhost/x",
            "ubuntu@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(check_image_reference(ok).is_ok(), "{ok}");
        }
        assert_eq!(super::registry_of("busybox"), "docker.io");
        assert_eq!(super::registry_of("library/busybox"), "docker.io");
        assert_eq!(
            super::registry_of("registry.example.com:5000/a/b"),
            "registry.example.com:5000"
        );
        assert_eq!(super::registry_of("localhost/x"), "localhost");
        assert_eq!(super::with_default_tag("ubuntu"), "ubuntu:latest");
        assert_eq!(
            super::with_default_tag("reg:5000/ubuntu"),
            "reg:5000/ubuntu:latest"
        );
        assert_eq!(super::with_default_tag("ubuntu:24.04"), "ubuntu:24.04");
        assert_eq!(
            super::with_default_tag("ubuntu@sha256:ab"),
            "ubuntu@sha256:ab"
        );
        for bad in [
            "ubuntu@sha256:0123456789abcdef",
            "x:.tag",
            "reg?x.io/a",
            "reg..io/a",
            "reg.io:99999999/a",
            "",
            "Busybox",
            "a b",
            "x:",
            "x::y",
            "-x",
            "x@sha256:",
            "x@nothex:zz",
            "a//b",
        ] {
            assert!(check_image_reference(bad).is_err(), "{bad}");
        }
    }
}
