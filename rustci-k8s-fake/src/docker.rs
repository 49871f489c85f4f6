//! The Docker side of the kubelet: creating, attaching, starting, signalling, waiting for
//! and removing containers, and the direct path used as a benchmark baseline.

use std::collections::HashMap;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, ContainerState};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, InspectContainerOptions, KillContainerOptions,
    ListContainersOptions, RemoveContainerOptions, WaitContainerOptions,
};
use futures::{Stream, StreamExt};

use crate::{CLUSTER_LABEL, FakeError};

/// The attached output of a container.
pub(crate) type Output =
    std::pin::Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// Whether a Docker error is a 404.
pub(crate) fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Creates the container and attaches to its stdout/stderr before it starts, so no output
/// is lost. On an attach failure the container is removed again.
pub(crate) async fn create_attached(
    docker: &Docker,
    name: Option<String>,
    body: ContainerCreateBody,
) -> Result<(String, Output), String> {
    let options = CreateContainerOptions {
        name,
        ..Default::default()
    };
    let created = docker
        .create_container(Some(options), body)
        .await
        .map_err(|e| e.to_string())?;
    let id = created.id;
    let attach = AttachContainerOptions {
        stream: true,
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    match docker.attach_container(&id, Some(attach)).await {
        Ok(a) => Ok((id, a.output)),
        Err(e) => {
            remove(docker, &id).await;
            Err(format!("cannot attach to container {id}: {e}"))
        }
    }
}

/// Starts a created container.
pub(crate) async fn start(docker: &Docker, id: &str) -> Result<(), String> {
    docker
        .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
        .await
        .map_err(|e| match e {
            bollard::errors::Error::DockerResponseServerError { message, .. } => message,
            other => other.to_string(),
        })
}

/// Sends `signal` (e.g. `SIGTERM`) to the container's PID 1; errors (not running, gone)
/// are ignored.
pub(crate) async fn signal(docker: &Docker, id: &str, signal: &str) {
    let options = KillContainerOptions {
        signal: signal.to_string(),
    };
    let _ = docker.kill_container(id, Some(options)).await;
}

/// The engine's state of a container.
pub(crate) async fn state(docker: &Docker, id: &str) -> Option<ContainerState> {
    docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
        .ok()?
        .state
}

/// Waits until the container is not running any more; returns its final state.
pub(crate) async fn wait_exit(docker: &Docker, id: &str) -> Option<ContainerState> {
    loop {
        let mut wait = docker.wait_container(id, None::<WaitContainerOptions>);
        let _ = wait.next().await;
        let state = state(docker, id).await;
        match &state {
            Some(s) if s.running == Some(true) => {
                // The wait request failed without the container exiting; wait again.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            _ => return state,
        }
    }
}

/// Removes a container (force, with its anonymous volumes).
pub(crate) async fn remove(docker: &Docker, id: &str) {
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    };
    let _ = docker.remove_container(id, Some(options)).await;
}

/// Ids of the containers labelled with this cluster id.
pub(crate) async fn containers_of(docker: &Docker, cluster_id: &str) -> Vec<String> {
    let mut filters = HashMap::new();
    filters.insert(
        "label".to_string(),
        vec![format!("{CLUSTER_LABEL}={cluster_id}")],
    );
    let options = ListContainersOptions {
        all: true,
        filters: Some(filters),
        ..Default::default()
    };
    docker
        .list_containers(Some(options))
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

/// Kills and removes every container of this cluster. A create request the engine was
/// still processing when the kubelet's tasks were aborted may land after the first sweep,
/// so a second sweep follows shortly after.
pub(crate) async fn remove_all(docker: &Docker, cluster_id: &str) {
    for sweep in 0..2 {
        if sweep > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        let ids = containers_of(docker, cluster_id).await;
        futures::future::join_all(ids.iter().map(|id| remove(docker, id))).await;
    }
}

/// The kubelet's container path used directly, without the API: creates a container of
/// `image` running `command` (as the entrypoint; the image's entrypoint when empty),
/// attaches before starting, drains its output, waits for its exit, removes it and returns
/// the exit code. `network_mode` is the Docker network mode, as
/// [`FakeConfig::network_mode`](crate::FakeConfig::network_mode) sets it for pods. The
/// baseline for benchmarks of the Kubernetes runner against the fake.
pub async fn run_container_direct(
    docker: &Docker,
    image: &str,
    command: Vec<String>,
    network_mode: &str,
) -> Result<i64, FakeError> {
    let body = ContainerCreateBody {
        image: Some(image.to_string()),
        host_config: Some(bollard::models::HostConfig {
            network_mode: Some(network_mode.to_string()),
            ..Default::default()
        }),
        entrypoint: (!command.is_empty()).then_some(command),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        labels: Some(HashMap::from([(
            "rustci.fake-direct".to_string(),
            "true".to_string(),
        )])),
        ..Default::default()
    };
    let (id, mut output) = create_attached(docker, None, body)
        .await
        .map_err(FakeError::Docker)?;
    if let Err(e) = start(docker, &id).await {
        remove(docker, &id).await;
        return Err(FakeError::Docker(e));
    }
    while let Some(item) = output.next().await {
        if item.is_err() {
            break;
        }
    }
    let state = wait_exit(docker, &id).await;
    remove(docker, &id).await;
    state
        .and_then(|s| s.exit_code)
        .ok_or_else(|| FakeError::Docker(format!("container {id} vanished")))
}
