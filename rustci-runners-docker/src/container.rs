//! Containers: creating and starting them with the job's limits, keep-alive containers
//! for multi-step jobs, workspaces, removal, and the start-up sweep of leftovers.

use std::collections::HashMap;
use std::path::PathBuf;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use rustci_runners::Error;
use rustci_runners::backend::{
    LABEL_JOB, LABEL_MANAGED, LABEL_OWNER, LABEL_RUNNER, LABEL_RUNNER_NAME, WORKSPACE,
};
use rustci_runners::job::Resources;

use crate::runner::{Inner, engine_error, is_not_found};

/// First process of every job container: stays alive between steps, forwards SIGTERM to
/// every other process of the container.
pub(crate) const KEEPALIVE: &str =
    "trap 'kill -TERM -1 2>/dev/null' TERM; while :; do sleep 86400 & wait $!; done";

/// Runs a single step as the container's own process (PID 1 is this `sh`): forwards
/// SIGTERM to every process, waits for the step, exits with its status. When it exits,
/// the kernel ends every other process of the container. As a background job of a
/// non-interactive shell, the step starts with SIGINT and SIGQUIT ignored.
pub(crate) const SINGLE_STEP: &str = "trap 'kill -TERM -1 2>/dev/null' TERM; \"$@\" & child=$!; \
    while :; do wait \"$child\"; code=$?; kill -0 \"$child\" 2>/dev/null || exit \"$code\"; done";

impl Inner {
    pub(crate) async fn sweep(&self) -> usize {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_RUNNER_NAME}={}", self.config.name),
            ],
        )]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let Ok(containers) = self.docker.list_containers(Some(options)).await else {
            return 0;
        };
        let host = self.owner.split('/').next().unwrap_or_default().to_string();
        let mut removed = 0;
        for c in containers {
            let owner = c
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_OWNER))
                .cloned()
                .unwrap_or_default();
            if rustci_runners::owner::owner_alive(&owner, &host).unwrap_or(true)
                || owner == self.owner
            {
                continue;
            }
            if let Some(id) = c.id {
                let job = c
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_JOB))
                    .cloned()
                    .unwrap_or_default();
                if remove_container(&self.docker, &id).await {
                    tracing::info!(container = %id, job_id = %job, "removed a container left by a crashed runner");
                    removed += 1;
                }
                if !self.local {
                    let _ = self
                        .docker
                        .remove_volume(
                            &format!("rustci-ws-{job}"),
                            None::<bollard::query_parameters::RemoveVolumeOptions>,
                        )
                        .await;
                } else {
                    let _ = std::fs::remove_dir_all(
                        self.config.workspace_root.join(format!("ws-{job}")),
                    );
                }
            }
        }
        removed
    }

    /// A workspace for `key` (a job id or a warm container's name) and the cleanup that
    /// removes it; returns the bind specification.
    pub(crate) fn workspace(&self, key: &str) -> Result<(String, Cleanup), Error> {
        let mut cleanup = Cleanup {
            docker: self.docker.clone(),
            container: None,
            host_dir: None,
            volume: None,
            background: false,
        };
        if self.local {
            let dir = self.config.workspace_root.join(format!("ws-{key}"));
            std::fs::create_dir(&dir)
                .map_err(|e| Error::io(format!("cannot create workspace {}", dir.display()), e))?;
            cleanup.host_dir = Some(dir.clone());
            if self.config.user.is_some() {
                // Steps run as another user than the runner's: let them write.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).map_err(
                    |e| {
                        Error::io(
                            format!("cannot open workspace {} to the step user", dir.display()),
                            e,
                        )
                    },
                )?;
            }
            Ok((format!("{}:{WORKSPACE}", dir.display()), cleanup))
        } else {
            cleanup.volume = Some(format!("rustci-ws-{key}"));
            Ok((format!("rustci-ws-{key}:{WORKSPACE}"), cleanup))
        }
    }

    /// Creates (does not start) a job container.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn create(
        &self,
        image: &str,
        key: &str,
        cmd: Vec<String>,
        env: Vec<String>,
        workdir: String,
        r: &Resources,
        cleanup: &mut Cleanup,
        bind: String,
    ) -> Result<String, Error> {
        let privileged = privileged_for(&self.config, image);
        let host_config = HostConfig {
            binds: Some(vec![bind]),
            network_mode: Some(self.config.network_mode.clone()),
            memory: r.memory.map(|m| m as i64),
            // Swap equal to memory: no swap on top of the limit.
            memory_swap: r.memory.map(|m| m as i64),
            nano_cpus: r.cpus.map(|c| (c * 1e9) as i64),
            pids_limit: r.pids.map(|p| p as i64),
            privileged: Some(privileged),
            security_opt: (!privileged).then(|| vec!["no-new-privileges:true".to_string()]),
            readonly_rootfs: Some(self.config.read_only_rootfs),
            cap_drop: (!self.config.cap_drop.is_empty()).then(|| self.config.cap_drop.clone()),
            ulimits: ulimits(r),
            ..Default::default()
        };
        let labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_JOB.to_string(), key.to_string()),
            (LABEL_RUNNER.to_string(), self.info.id.clone()),
            (LABEL_RUNNER_NAME.to_string(), self.config.name.clone()),
            (LABEL_OWNER.to_string(), self.owner.clone()),
        ]);
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: Some(cmd),
            entrypoint: Some(vec![]),
            labels: Some(labels),
            working_dir: Some(workdir),
            user: self.config.user.clone(),
            env: Some(env),
            host_config: Some(host_config),
            ..Default::default()
        };
        let name = format!("rustci-{key}");
        // By name, before the call: a create that succeeds on the engine but fails on the
        // way back is removed all the same.
        cleanup.container = Some(name.clone());
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| engine_error(&format!("cannot create a container from {image}"), e))?;
        cleanup.container = Some(created.id.clone());
        Ok(created.id)
    }

    pub(crate) async fn start_container(&self, id: &str, image: &str) -> Result<(), Error> {
        self.docker
            .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
            .await
            .map_err(|e| engine_error(&format!("cannot start a container from {image}"), e))
    }

    /// A started keep-alive container for `image` with no job yet.
    pub(crate) async fn keepalive(
        &self,
        image: &str,
        key: &str,
        env: Vec<String>,
        r: &Resources,
    ) -> Result<(String, Cleanup), Error> {
        let (bind, mut cleanup) = self.workspace(key)?;
        let id = self
            .create(
                image,
                key,
                vec!["/bin/sh".into(), "-c".into(), KEEPALIVE.into()],
                env,
                WORKSPACE.into(),
                r,
                &mut cleanup,
                bind,
            )
            .await?;
        self.start_container(&id, image).await?;
        Ok((id, cleanup))
    }
}

/// Whether a container of `image` runs privileged: only when the configuration turns it
/// on, and then for the allowed images (all of them when none are listed).
pub(crate) fn privileged_for(config: &crate::DockerConfig, image: &str) -> bool {
    use crate::image::with_default_tag;
    let allowed = &config.allowed_privileged_images;
    config.privileged
        && (allowed.is_empty()
            || allowed
                .iter()
                .any(|a| with_default_tag(a) == with_default_tag(image)))
}

/// `resources.cpu_time`, `open_files` and `file_size` as container ulimits.
pub(crate) fn ulimits(r: &Resources) -> Option<Vec<bollard::models::ResourcesUlimits>> {
    let limit = |name: &str, value: u64| bollard::models::ResourcesUlimits {
        name: Some(name.to_string()),
        soft: Some(value as i64),
        hard: Some(value as i64),
    };
    let mut out = Vec::new();
    if let Some(t) = r.cpu_time {
        out.push(limit("cpu", t.as_secs_f64().ceil().max(1.0) as u64));
    }
    if let Some(n) = r.open_files {
        out.push(limit("nofile", n));
    }
    if let Some(bytes) = r.file_size {
        // The engine takes fsize in bytes.
        out.push(limit("fsize", bytes));
    }
    (!out.is_empty()).then_some(out)
}

/// The engine's view of a container's state, when it answers.
pub(crate) async fn container_state(
    docker: &Docker,
    id: &str,
) -> Option<bollard::models::ContainerState> {
    docker
        .inspect_container(
            id,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .ok()?
        .state
}

pub(crate) async fn remove_container(docker: &Docker, id: &str) -> bool {
    let options = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(id, Some(options)).await {
        Ok(()) => true,
        Err(e) => is_not_found(&e),
    }
}

/// Removes the container and workspace of a job when dropped.
pub(crate) struct Cleanup {
    pub(crate) docker: Docker,
    pub(crate) container: Option<String>,
    pub(crate) host_dir: Option<PathBuf>,
    pub(crate) volume: Option<String>,
    /// Set on the copy a drop hands to a background task: if that task is dropped
    /// without running (the runtime is shutting down), its own drop must not spawn again.
    pub(crate) background: bool,
}

impl Cleanup {
    pub(crate) async fn run(mut self) {
        if let Some(id) = self.container.take() {
            remove_container(&self.docker, &id).await;
        }
        if let Some(volume) = self.volume.take() {
            let _ = self
                .docker
                .remove_volume(
                    &volume,
                    None::<bollard::query_parameters::RemoveVolumeOptions>,
                )
                .await;
        }
        if let Some(dir) = self.host_dir.take()
            && let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            // Typically files a container's root user made, below a runner that is not
            // root: left for an administrator, named in the log.
            tracing::warn!(workspace = %dir.display(), error = %e, "cannot remove a workspace");
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Start failed midway (or the task was dropped): finish the removal in the
        // background if a runtime is there, else remove what is local.
        if self.container.is_none() && self.volume.is_none() || self.background {
            if let Some(dir) = self.host_dir.take() {
                let _ = std::fs::remove_dir_all(dir);
            }
            if let Some(id) = &self.container {
                // The runtime went away before the removal ran: the next start of a
                // runner with this name sweeps it.
                tracing::warn!(container = %id, "left for the next sweep: no runtime to remove it");
            }
            return;
        }
        let rest = Cleanup {
            docker: self.docker.clone(),
            container: self.container.take(),
            host_dir: self.host_dir.take(),
            volume: self.volume.take(),
            background: true,
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(rest.run());
        } else if let Some(dir) = rest.host_dir.clone() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::privileged_for;
    use crate::DockerConfig;

    #[test]
    fn privileges_only_where_the_configuration_allows_them() {
        let mut c = DockerConfig::default();
        assert!(!privileged_for(&c, "busybox"));
        c.privileged = true;
        assert!(privileged_for(&c, "anything:1"));
        c.allowed_privileged_images = vec!["docker:dind".into(), "busybox".into()];
        assert!(privileged_for(&c, "docker:dind"));
        assert!(privileged_for(&c, "busybox:latest"), "no tag means :latest");
        assert!(!privileged_for(&c, "busybox:1.36"));
        assert!(!privileged_for(&c, "docker:cli"));
        c.privileged = false;
        assert!(
            !privileged_for(&c, "docker:dind"),
            "the list alone grants nothing"
        );
    }
}
