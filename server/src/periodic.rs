//! The loop of the server's background tasks (block expiry, retention,
//! the alert monitor): do the work at every tick of a fixed interval until
//! shutdown. A tick missed while the work ran is not made up for (the next
//! one follows a full interval later), and the first tick is at once.

use std::future::Future;
use std::time::Duration;

/// Runs `work` now and then every `period` until `shutdown` resolves.
/// Shutdown is seen between two runs; a run in progress completes.
pub async fn every<F, Fut>(period: Duration, shutdown: impl Future<Output = ()>, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        work().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn runs_at_once_then_every_period_until_shutdown() {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let started = tokio::time::Instant::now();
        let task = tokio::spawn(every(
            Duration::from_millis(20),
            async move {
                let _ = stopped.await;
            },
            move || {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            },
        ));
        while runs.load(Ordering::SeqCst) < 3 {
            assert!(started.elapsed() < Duration::from_secs(10), "three runs take about 40 ms");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(40), "the runs are a period apart");
        stop.send(()).unwrap();
        task.await.unwrap();
        let done = runs.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(runs.load(Ordering::SeqCst), done, "nothing after shutdown");
    }
}
