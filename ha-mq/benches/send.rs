//! A synchronous send through `HaProducer` vs a bare `rocketmq-client-rust` producer sending to
//! the same broker (the lab's `bj-a` cluster), in one run. Run with
//! `cargo bench -p ha-mq --bench send`; the ratio of the medians is what matters.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use ha_lab::rocketmq::{RocketMqLab, RocketMqLabOptions};
use ha_mq::rocketmq_client_rust::{
    ClientConfig, ClientRuntime, ClientRuntimeConfig, DefaultMQProducer,
};
use ha_mq::{ClusterConfig, HaProducer, OutgoingMessage, ProducerConfig};
use rocketmq_model::common::message::message_single::Message;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (lab, ha, bare, _owner) = rt.block_on(async {
        let lab = RocketMqLab::start(RocketMqLabOptions::default())
            .await
            .unwrap();
        let clusters: Vec<ClusterConfig> = ["bj-a", "sh-a"]
            .iter()
            .map(|idc| ClusterConfig::new(*idc, vec![lab.namesrv_addr(idc).unwrap()]))
            .collect();
        let ha = HaProducer::start(ProducerConfig::new("bench-ha", clusters), None)
            .await
            .unwrap();
        let owner = rocketmq_runtime::RuntimeOwner::plan(
            rocketmq_runtime::RuntimeConfig::for_parallelism("bench", 2),
        )
        .unwrap()
        .build()
        .unwrap();
        let runtime = ClientRuntime::try_new(
            owner.root_context().component("bench"),
            ClientRuntimeConfig::default(),
            rocketmq_observability::TelemetryHandle::noop(),
        )
        .unwrap();
        let mut cfg = ClientConfig::default();
        cfg.set_instance_name("bench-bare".into());
        let mut bare = DefaultMQProducer::builder(Arc::clone(&runtime))
            .client_config(cfg)
            .name_server_addr(lab.namesrv_addr("bj-a").unwrap().to_string())
            .producer_group("bench-bare")
            .build();
        bare.start().await.unwrap();
        // The topic exists and both paths are warm.
        for _ in 0..20 {
            ha.send(OutgoingMessage::new("bench", "x")).await.unwrap();
            let m = Message::builder()
                .topic("bench")
                .body_slice(b"x")
                .key("k")
                .build()
                .unwrap();
            bare.send_with_timeout(m, 2000).await.unwrap();
        }
        (lab, ha, Arc::new(bare), owner)
    });
    let mut g = c.benchmark_group("mq");
    g.measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30);
    let body = bytes::Bytes::from_static(&[7u8; 128]);
    g.bench_function("send/ha", |b| {
        b.to_async(&rt).iter(|| {
            let ha = ha.clone();
            let body = body.clone();
            async move {
                let r = ha
                    .send(OutgoingMessage::new("bench", body).key(ha_mq::generate_key()))
                    .await
                    .unwrap();
                assert_eq!(r.idc.as_deref(), Some("bj-a"));
            }
        })
    });
    g.bench_function("send/bare", |b| {
        b.to_async(&rt).iter(|| {
            let bare = Arc::clone(&bare);
            let body = body.clone();
            async move {
                // The same work a caller would do: a keyed message.
                let m = Message::builder()
                    .topic("bench")
                    .body(body)
                    .key(ha_mq::generate_key())
                    .build()
                    .unwrap();
                bare.send_with_timeout(m, 2000).await.unwrap().unwrap();
            }
        })
    });
    g.finish();
    rt.block_on(async {
        ha.shutdown().await;
        drop(lab);
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
