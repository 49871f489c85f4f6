//! The warm pool: started keep-alive containers per image waiting for a job, refilled
//! in the background after each use and reaped when idle.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rustci_runners::JobId;
use rustci_runners::job::Resources;
use tokio::time::Instant;

use crate::DockerRunner;
use crate::container::{Cleanup, container_state};
use crate::runner::Inner;

/// The warm pool's bookkeeping, under one lock.
#[derive(Default)]
pub(crate) struct WarmState {
    /// Started containers per image, oldest first.
    pub(crate) ready: HashMap<String, Vec<WarmContainer>>,
    /// Containers being started per image.
    pub(crate) pending: HashMap<String, usize>,
    /// Set by shutdown or drop: nothing is added any more.
    pub(crate) closed: bool,
}

impl WarmState {
    pub(crate) fn close(&mut self) -> Vec<WarmContainer> {
        self.closed = true;
        self.ready.drain().flat_map(|(_, v)| v).collect()
    }
}

/// A started keep-alive container waiting for a job.
pub(crate) struct WarmContainer {
    pub(crate) id: String,
    pub(crate) cleanup: Cleanup,
    pub(crate) born: Instant,
}

impl DockerRunner {
    /// Waits until every image of the warm pool has its full number of warm containers
    /// (returns at once without a pool).
    pub async fn warm_up(&self) {
        let Some(pool) = self.inner.config.warm_pool.clone() else {
            return;
        };
        loop {
            let notified = self.inner.warm_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if pool.images.iter().all(|i| self.warm_ready(i) >= pool.size) {
                return;
            }
            // Starts what is missing (again, after a failed start), then waits for news.
            for image in &pool.images {
                self.inner.top_up(image);
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        }
    }

    /// Warm containers ready now for `image`.
    pub fn warm_ready(&self, image: &str) -> usize {
        self.inner
            .warm
            .lock()
            .expect("warm pool")
            .ready
            .get(image)
            .map_or(0, Vec::len)
    }
}

impl Inner {
    /// Starts, in the background, as many warm containers for `image` as the pool lacks
    /// (counting those already starting). Does nothing for images the pool does not keep.
    pub(crate) fn top_up(self: &Arc<Self>, image: &str) {
        let Some(pool) = &self.config.warm_pool else {
            return;
        };
        if !pool.images.iter().any(|i| i == image) {
            return;
        }
        let missing = {
            let mut warm = self.warm.lock().expect("warm pool");
            if warm.closed {
                return;
            }
            let have = warm.ready.get(image).map_or(0, Vec::len)
                + warm.pending.get(image).copied().unwrap_or(0);
            let missing = pool.size.saturating_sub(have);
            *warm.pending.entry(image.to_string()).or_default() += missing;
            missing
        };
        for _ in 0..missing {
            let inner = self.clone();
            let image = image.to_string();
            self.tasks.spawn(async move {
                let key = format!("warm-{}", JobId::new());
                let started = inner
                    .keepalive(&image, &key, Vec::new(), &Resources::default())
                    .await;
                let surplus = {
                    let mut warm = inner.warm.lock().expect("warm pool");
                    if let Some(p) = warm.pending.get_mut(&image) {
                        *p = p.saturating_sub(1);
                    }
                    match started {
                        Ok((id, cleanup)) if !warm.closed => {
                            warm.ready
                                .entry(image.clone())
                                .or_default()
                                .push(WarmContainer {
                                    id,
                                    cleanup,
                                    born: Instant::now(),
                                });
                            None
                        }
                        Ok((_, cleanup)) => Some(cleanup),
                        Err(e) => {
                            tracing::warn!(%image, error = %rustci_runners::error::Chain(&e), "cannot start a warm container");
                            None
                        }
                    }
                };
                if let Some(cleanup) = surplus {
                    cleanup.run().await;
                }
                inner.warm_changed.notify_waiters();
            });
        }
    }

    pub(crate) async fn reap_idle(&self, idle: Duration) {
        let expired: Vec<WarmContainer> = {
            let mut warm = self.warm.lock().expect("warm pool");
            let mut out = Vec::new();
            for list in warm.ready.values_mut() {
                let (old, young): (Vec<_>, Vec<_>) =
                    list.drain(..).partition(|w| w.born.elapsed() >= idle);
                *list = young;
                out.extend(old);
            }
            out
        };
        for w in expired {
            w.cleanup.run().await;
        }
    }

    /// The oldest warm container for `image` that is still running; dead ones are
    /// discarded.
    pub(crate) async fn take_warm(&self, image: &str) -> Option<WarmContainer> {
        loop {
            let candidate = {
                let mut warm = self.warm.lock().expect("warm pool");
                let list = warm.ready.get_mut(image)?;
                if list.is_empty() {
                    return None;
                }
                list.remove(0)
            };
            let running = container_state(&self.docker, &candidate.id)
                .await
                .and_then(|s| s.running)
                == Some(true);
            if running {
                return Some(candidate);
            }
            candidate.cleanup.run().await;
        }
    }
}
