//! A producer dropped without `shutdown` leaves nothing running: its spool's replay task ends
//! and lets go of the spool directory (no lab needed: the clusters are unreachable).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ha_mq::spool::{Spool, SpoolConfig};
use ha_mq::{ClusterConfig, HaProducer, OutgoingMessage, ProducerConfig};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_producer_ends_its_replay_task_and_frees_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on these ports: every send fails and goes to the spool.
    let dead = |p: u16| vec![format!("127.0.0.1:{p}").parse().unwrap()];
    let cfg = ProducerConfig::new(
        "p",
        vec![
            ClusterConfig::new("bj-a", dead(9)),
            ClusterConfig::new("sh-a", dead(7)),
        ],
    )
    .start_degraded(true)
    .deadline(Duration::from_secs(1))
    .spool(SpoolConfig::new(dir.path()));
    let p = HaProducer::start(cfg, None).await.unwrap();
    let r = p
        .send(OutgoingMessage::new("t", "x").key("k1"))
        .await
        .unwrap();
    assert!(r.spooled, "{r:?}");
    // While the producer lives, the spool directory is taken.
    assert!(Spool::open(SpoolConfig::new(dir.path())).await.is_err());
    drop(p);
    // Bounded: the replay task lets go within its current step.
    let end = Instant::now() + Duration::from_secs(20);
    let spool = loop {
        match Spool::open(SpoolConfig::new(dir.path())).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < end, "spool still held after drop: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // Nothing acknowledged was lost: the spooled message is still there.
    assert_eq!(spool.len(), 1);
    let (_, rec) = spool.next_pending().await.unwrap().unwrap();
    assert_eq!(rec.key, "k1");
}
