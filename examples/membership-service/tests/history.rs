//! The history writer (`Store::record`, the consumer's handler) against a semi-synchronous
//! primary cut off from its replicas: MariaDB commits after `rpl_semi_sync_master_timeout`
//! without any replica, and the row would exist only on the old primary that the HA replaces
//! and fences. The demo's `partition-bj-a` lost history rows that way; `Store::record` must
//! report such a write as failed (the consumer then runs it again), never as done; a PUT's
//! commit likewise (`Store::commit_put`). Needs root,
//! nft, cgroup v2 and mariadbd (`scripts/setup`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::time::Duration;

use ha_core::{HaContext, Topology};
use ha_lab::mariadb::{APP_PASSWORD, APP_USER, DATABASE, MariaDbLab, MariaDbLabOptions};
use ha_mysql::HaMysql;
use ha_mysql::mysql_async::prelude::{FromRow, Queryable};
use membership_service::model::MemberInput;
use membership_service::store::{MemberEvent, Store, StoreError};

/// Bound on the whole test.
const TEST_BOUND: Duration = Duration::from_secs(120);

/// The rows `q` finds on `node` (as the lab's admin).
async fn on_node<T: FromRow + Send + 'static>(lab: &MariaDbLab, node: &str, q: String) -> Vec<T> {
    let n = lab.node(node).unwrap().clone();
    let mut c = lab.admin_conn(&n).await.unwrap();
    let v: Vec<T> = c.query(q).await.unwrap();
    let _ = c.disconnect().await;
    v
}

async fn rows_on(lab: &MariaDbLab, node: &str, id: u64) -> Vec<u64> {
    on_node(
        lab,
        node,
        format!("SELECT version FROM {DATABASE}.member_history WHERE id = {id}"),
    )
    .await
}

async fn member_version_on(lab: &MariaDbLab, node: &str, id: u64) -> Option<u64> {
    on_node(
        lab,
        node,
        format!("SELECT version FROM {DATABASE}.members WHERE id = {id}"),
    )
    .await
    .first()
    .copied()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_row_committed_without_a_semi_sync_ack_is_not_reported_written() {
    if !ha_lab::partition::nft_available() {
        eprintln!("skipped: nft not found (install the Debian package nftables)");
        return;
    }
    let run = async {
        let mut opts = MariaDbLabOptions::default();
        // The stack's setting: after 1 s without a replica the primary commits alone.
        opts.semi_sync = Some(Duration::from_secs(1));
        let lab = MariaDbLab::start(opts).await.unwrap();
        assert_eq!(lab.primary().idc, "bj-a");
        // This process is the bj-a instance's consumer: in bj-a, with the primary, before it
        // connects.
        lab.cgroup("bj-a")
            .expect("an IDC cgroup (root, cgroup v2)")
            .add(std::process::id())
            .unwrap();
        let settings = format!(
            "[dependencies.db.settings]\nuser = \"{APP_USER}\"\npassword = \"{APP_PASSWORD}\"\n\
             database = \"{DATABASE}\"\nconnect_timeout = \"300ms\"\ntimeout = \"2s\"\n"
        );
        let toml = lab.topology_toml("bj-a", "db", &settings);
        let ctx = HaContext::new(Topology::from_toml_str(&toml, "lab.toml").unwrap());
        let db: HaMysql = HaMysql::from_context(&ctx, "db")
            .await
            .unwrap()
            .connect()
            .await
            .unwrap();
        Store::ensure_schema(&db, Duration::from_secs(5))
            .await
            .unwrap();
        let event = |version| MemberEvent {
            kind: "member.updated".into(),
            id: 42,
            version,
        };
        // Whole: written and replicated.
        Store::record(&db, &event(1), Duration::from_secs(5))
            .await
            .unwrap();
        let whole = MemberInput::parse(
            br#"{"name":"Ann","level":"basic","expires_at":"2027-01-31T00:00:00Z"}"#,
        )
        .unwrap();
        let (v, _) = Store::commit_put(&db, 8, &whole, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(v, 1, "a replicated PUT is acknowledged");

        // bj-a cut off: the commit waits 1 s for a replica, then happens on bj-a alone.
        let cut = lab.partition("bj-a").unwrap();
        let got = Store::record(&db, &event(2), Duration::from_secs(3)).await;
        println!("record during the cut: {got:?}");
        assert!(
            got.is_err(),
            "a row committed without any replica was reported written"
        );
        // The commit did happen on the cut-off primary (after the semi-sync timeout, without
        // a replica's acknowledgement). Whether a replica received it is not what decides: the
        // lab's cut drops the replicas' packets to the primary (their acknowledgements), and
        // a promoted replica stops taking the old primary's binlog.
        assert_eq!(rows_on(&lab, "mariadb-bj-a", 42).await, vec![1, 2]);

        // A PUT's commit likewise: made on bj-a alone, it is not acknowledged (outcome
        // unknown, a 503), and it is there on the cut-off primary.
        let input = MemberInput::parse(
            br#"{"name":"Zo\u00eb","level":"gold","expires_at":"2027-01-31T00:00:00Z"}"#,
        )
        .unwrap();
        let put = Store::commit_put(&db, 7, &input, Duration::from_secs(3)).await;
        println!("put during the cut: {put:?}");
        match &put {
            Err(StoreError::Unavailable { source, .. }) => assert!(
                source.to_string().contains("outcome") || source.to_string().contains("semi-sync"),
                "{source}"
            ),
            other => panic!("a PUT committed without any replica was acknowledged: {other:?}"),
        }
        assert_eq!(member_version_on(&lab, "mariadb-bj-a", 7).await, Some(1));
        drop(cut);
        lab.stop_ha();
    };
    tokio::time::timeout(TEST_BOUND, run)
        .await
        .expect("the test finished within its bound");
}
