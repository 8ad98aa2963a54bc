//! Waiting for a condition instead of sleeping a fixed time.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Calls `check` until it returns `Ok`, at most until `timeout` has passed,
/// and returns its value. Each attempt is itself bounded by the time left, so
/// a hanging attempt cannot hang the test. The error of the last attempt is
/// returned when time runs out.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        let outcome = match tokio::time::timeout(left.max(Duration::from_millis(50)), check()).await
        {
            Ok(outcome) => outcome,
            Err(_) => Err(anyhow::anyhow!("attempt did not finish in time")),
        };
        match outcome {
            Ok(value) => return Ok(value),
            Err(err) if Instant::now() >= deadline => {
                return Err(err.context(format!(
                    "condition still not met after {timeout:?} ({attempts} attempts)"
                )));
            }
            Err(_) => {
                // Poll interval between attempts, not a wait for start-up.
                tokio::time::sleep(delay.min(deadline.saturating_duration_since(Instant::now())))
                    .await;
                delay = (delay * 2).min(Duration::from_millis(200));
            }
        }
    }
}
