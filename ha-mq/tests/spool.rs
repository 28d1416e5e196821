//! The spool's guarantees, on real files in temporary directories: order, reopening, torn tails
//! and corruption, the size bound, segment deletion, group commit under concurrency, and a
//! process killed with SIGKILL while appending and again while replaying.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{HashMap, HashSet};
use std::env;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ha_mq::spool::{Spool, SpoolConfig, SpoolError, SpoolRecord};

const SEGMENT_HEADER: u64 = 16;

fn record(i: u64) -> SpoolRecord {
    let r = SpoolRecord::new("orders", format!("k{i}"), body_for(&format!("k{i}")));
    match i % 3 {
        0 => r,
        1 => r.tags("created").property("region", "sh"),
        _ => r
            .tags("")
            .property("a", "1")
            .property("b", "")
            .property("", "c"),
    }
}

/// A body that tells its key, so a replayed record can be checked byte for byte.
fn body_for(key: &str) -> Bytes {
    Bytes::from(format!("body of {key}: {}", key.repeat(3)).into_bytes())
}

async fn drain(spool: &Spool) -> Vec<(u64, SpoolRecord)> {
    let mut out = Vec::new();
    while let Some(r) = spool.next_pending().await.unwrap() {
        out.push(r);
    }
    out
}

/// Records of one size.
fn fixed(i: u64) -> SpoolRecord {
    SpoolRecord::new("orders", format!("{i:06}"), vec![7; 60])
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs
}

fn first_seq_of(segment: &Path) -> u64 {
    segment
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Each frame of a segment: (offset, length with header, starts a write).
fn frames(segment: &Path) -> Vec<(u64, u64, bool)> {
    let data = fs::read(segment).unwrap();
    let mut out = Vec::new();
    let mut at = SEGMENT_HEADER as usize;
    while at < data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize + 8;
        out.push((at as u64, len as u64, data[at + 16] & 1 == 1));
        at += len;
    }
    assert_eq!(
        at,
        data.len(),
        "frames end at the end of {}",
        segment.display()
    );
    out
}

fn flip_byte(path: &Path, offset: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0];
    file.read_exact_at(&mut b, offset).unwrap();
    file.write_all_at(&[b[0] ^ 0x5a], offset).unwrap();
}

async fn append_n(spool: &Spool, range: std::ops::Range<u64>) {
    for i in range {
        assert_eq!(spool.append(&record(i)).await.unwrap(), i);
    }
}

#[tokio::test]
async fn round_trip_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
    assert!(spool.is_empty());
    assert_eq!(spool.next_pending().await.unwrap(), None);

    let empty = SpoolRecord::new("", "", Bytes::new());
    let binary = SpoolRecord::new("t", "bin", (0..=255u8).collect::<Vec<_>>());
    assert_eq!(spool.append(&empty).await.unwrap(), 0);
    assert_eq!(spool.append(&binary).await.unwrap(), 1);
    for i in 2..100 {
        assert_eq!(spool.append(&record(i)).await.unwrap(), i);
    }
    assert_eq!(spool.len(), 100);
    assert!(spool.disk_bytes() > SEGMENT_HEADER);

    let got = drain(&spool).await;
    assert_eq!(got.len(), 100);
    assert_eq!(got[0], (0, empty));
    assert_eq!(got[1], (1, binary));
    for (i, (seq, r)) in got.iter().enumerate().skip(2) {
        assert_eq!((*seq, r), (i as u64, &record(i as u64)));
    }
    // Handed out is not committed.
    assert_eq!(spool.len(), 100);
    spool.commit(99).await.unwrap();
    assert!(spool.is_empty());
    assert_eq!(spool.next_pending().await.unwrap(), None);
}

#[tokio::test]
async fn reopen_replays_exactly_the_uncommitted() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
    append_n(&spool, 0..10).await;
    for i in 0..6 {
        assert_eq!(spool.next_pending().await.unwrap().unwrap().0, i);
    }
    spool.commit(3).await.unwrap();
    drop(spool);

    let spool = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
    assert_eq!(spool.len(), 6);
    let got = drain(&spool).await;
    let seqs: Vec<u64> = got.iter().map(|r| r.0).collect();
    assert_eq!(seqs, (4..10).collect::<Vec<_>>());
    assert_eq!(got[0].1, record(4));
    assert_eq!(spool.append(&record(10)).await.unwrap(), 10);

    // Everything committed: the segments go, the checkpoint keeps the numbering.
    assert_eq!(spool.next_pending().await.unwrap().unwrap().0, 10);
    spool.commit(10).await.unwrap();
    assert!(segments(tmp.path()).is_empty());
    drop(spool);
    let spool = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
    assert!(spool.is_empty());
    assert_eq!(spool.next_pending().await.unwrap(), None);
    assert_eq!(spool.append(&record(11)).await.unwrap(), 11);
    assert_eq!(drain(&spool).await, vec![(11, record(11))]);
}

#[tokio::test]
async fn rewind_hands_out_the_uncommitted_again() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
    append_n(&spool, 0..5).await;
    assert_eq!(drain(&spool).await.len(), 5);
    spool.commit(1).await.unwrap();
    spool.rewind().await;
    let seqs: Vec<u64> = drain(&spool).await.iter().map(|r| r.0).collect();
    assert_eq!(seqs, vec![2, 3, 4]);
    // A commit past a rewound position moves it on.
    spool.rewind().await;
    spool.commit(3).await.unwrap();
    assert_eq!(drain(&spool).await, vec![(4, record(4))]);
}

#[tokio::test]
async fn commit_of_a_record_not_handed_out_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
    let err = spool.commit(0).await.unwrap_err();
    assert!(
        matches!(
            err,
            SpoolError::NotRead {
                seq: 0,
                read_end: 0
            }
        ),
        "{err}"
    );
    append_n(&spool, 0..2).await;
    assert!(matches!(
        spool.commit(0).await,
        Err(SpoolError::NotRead { .. })
    ));
    spool.next_pending().await.unwrap();
    spool.commit(0).await.unwrap();
    // Committing again, or below the commit point, changes nothing.
    spool.commit(0).await.unwrap();
    assert_eq!(spool.len(), 1);
}

#[tokio::test]
async fn appends_during_replay_come_after_the_earlier_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let config = SpoolConfig::new(tmp.path()).segment_bytes(4096);
    let spool = Spool::open(config).await.unwrap();
    append_n(&spool, 0..10).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(spool.next_pending().await.unwrap().unwrap().0);
    }
    append_n(&spool, 10..15).await;

    // And concurrently: one task appends while another replays and commits.
    let done = Arc::new(AtomicBool::new(false));
    let appender = {
        let (spool, done) = (spool.clone(), Arc::clone(&done));
        tokio::spawn(async move {
            append_n(&spool, 15..400).await;
            done.store(true, Ordering::Release);
        })
    };
    loop {
        let finished = done.load(Ordering::Acquire);
        match spool.next_pending().await.unwrap() {
            Some((seq, r)) => {
                assert_eq!(r, record(seq));
                got.push(seq);
                if seq % 25 == 0 {
                    spool.commit(seq).await.unwrap();
                }
            }
            None if finished => break,
            None => tokio::task::yield_now().await,
        }
    }
    appender.await.unwrap();
    assert_eq!(got, (0..400).collect::<Vec<_>>());
}

#[tokio::test]
async fn torn_tail_cut_mid_record_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
    append_n(&spool, 0..5).await;
    drop(spool);
    let seg = &segments(tmp.path())[0];
    let len = fs::metadata(seg).unwrap().len();
    let last = *frames(seg).last().unwrap();
    for cut in [len - 3, last.0 + 5, last.0 + 1] {
        OpenOptions::new()
            .write(true)
            .open(seg)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let spool = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
        assert_eq!(
            fs::metadata(seg).unwrap().len(),
            last.0,
            "the torn record is cut off"
        );
        let got = drain(&spool).await;
        assert_eq!(got, (0..4).map(|i| (i, record(i))).collect::<Vec<_>>());
        // The lost record's number is reused: it was never acknowledged.
        assert_eq!(spool.append(&record(4)).await.unwrap(), 4);
        drop(spool);
        assert_eq!(fs::metadata(seg).unwrap().len(), len);
    }
}

#[tokio::test]
async fn garbage_after_the_last_record_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
    append_n(&spool, 0..5).await;
    drop(spool);
    let seg = &segments(tmp.path())[0];
    let len = fs::metadata(seg).unwrap().len();
    // Zeros (a file extended but never written, as after a power loss), pseudo-random bytes,
    // and a length that fits but a checksum that does not.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let random: Vec<u8> = (0..300)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut plausible = 40u32.to_le_bytes().to_vec();
    plausible.extend([0xab; 44]);
    for garbage in [vec![0; 4096], random, plausible] {
        OpenOptions::new()
            .append(true)
            .open(seg)
            .unwrap()
            .write_all(&garbage)
            .unwrap();
        let spool = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
        assert_eq!(fs::metadata(seg).unwrap().len(), len);
        assert_eq!(
            drain(&spool).await,
            (0..5).map(|i| (i, record(i))).collect::<Vec<_>>()
        );
    }
}

#[tokio::test]
async fn segment_torn_while_created_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
    append_n(&spool, 0..3).await;
    drop(spool);
    for partial in [&b""[..], &b"HASPS"[..], &[0u8; 16][..]] {
        let torn = tmp.path().join(format!("{:020}.seg", 3));
        fs::write(&torn, partial).unwrap();
        let spool = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
        assert!(!torn.exists());
        assert_eq!(drain(&spool).await.len(), 3);
        drop(spool);
    }
}

/// The power-loss case: the last write's pages reached the disk out of order, so a hole sits
/// before intact frames of the same (never acknowledged) write. Only a frame that *starts* a
/// write proves the damage is in acknowledged data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hole_inside_the_last_write_is_a_torn_tail() {
    let tmp = tempfile::tempdir().unwrap();
    // A batching window makes concurrent appends share a write; rounds go on until the last
    // write holds several frames.
    let config = SpoolConfig::new(tmp.path()).batch_delay(Duration::from_millis(20));
    let spool = Spool::open(config).await.unwrap();
    // One write before the torn one, so the segment keeps a record.
    spool.append(&record(0)).await.unwrap();
    let mut next = 0;
    let seg = loop {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let spool = spool.clone();
                tokio::spawn(async move { spool.append(&record(0)).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        next += 8;
        let seg = segments(tmp.path())[0].clone();
        let f = frames(&seg);
        let last_start = f.iter().rposition(|fr| fr.2).unwrap();
        if f.len() - last_start >= 2 {
            break seg;
        }
        assert!(next < 8 * 100, "no write of several frames in 100 rounds");
    };
    drop(spool);
    let f = frames(&seg);
    let last_start = f.iter().rposition(|fr| fr.2).unwrap();
    let (hole_at, hole_len, _) = f[last_start];
    let file = OpenOptions::new().write(true).open(&seg).unwrap();
    file.write_all_at(&vec![0; hole_len as usize], hole_at)
        .unwrap();
    drop(file);

    assert!(last_start >= 1);
    let spool = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
    assert_eq!(fs::metadata(&seg).unwrap().len(), hole_at);
    assert_eq!(drain(&spool).await.len(), last_start);
}

#[tokio::test]
async fn damaged_record_before_an_intact_write_is_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
    append_n(&spool, 0..5).await;
    drop(spool);
    let seg = segments(tmp.path())[0].clone();
    let (at, len, _) = frames(&seg)[2];
    flip_byte(&seg, at + len - 3);
    let err = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap_err();
    match &err {
        SpoolError::Corrupt { path, offset, why } => {
            assert_eq!((path, *offset), (&seg, at));
            assert!(why.contains("checksum"), "{why}");
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    assert!(err.is_corrupt());
    // Nothing was cut off: the data is still there for a person to look at.
    assert_eq!(frames(&seg).len(), 5);
}

#[tokio::test]
async fn damaged_record_in_an_older_segment_is_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let config = SpoolConfig::new(tmp.path()).segment_bytes(300);
    let spool = Spool::open(config.clone()).await.unwrap();
    append_n(&spool, 0..20).await;
    drop(spool);
    let segs = segments(tmp.path());
    assert!(segs.len() >= 3);
    // The end of the first segment: a tail, but not the newest one.
    let (at, len, _) = *frames(&segs[0]).last().unwrap();
    OpenOptions::new()
        .write(true)
        .open(&segs[0])
        .unwrap()
        .set_len(at + len - 1)
        .unwrap();
    let err = Spool::open(config).await.unwrap_err();
    assert!(
        matches!(&err, SpoolError::Corrupt { path, offset, .. } if path == &segs[0] && *offset == at),
        "{err}"
    );
}

#[tokio::test]
async fn missing_segment_is_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let config = SpoolConfig::new(tmp.path()).segment_bytes(300);
    let spool = Spool::open(config.clone()).await.unwrap();
    append_n(&spool, 0..20).await;
    drop(spool);
    let segs = segments(tmp.path());
    fs::remove_file(&segs[1]).unwrap();
    let err = Spool::open(config.clone()).await.unwrap_err();
    assert!(
        matches!(&err, SpoolError::Corrupt { path, .. } if path == &segs[2]),
        "{err}"
    );
    // And the first one: acknowledged records gone without a checkpoint saying so.
    fs::remove_file(&segs[0]).unwrap();
    let err = Spool::open(config).await.unwrap_err();
    assert!(err.is_corrupt(), "{err}");
}

#[tokio::test]
async fn corrupt_checkpoint_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
    append_n(&spool, 0..2).await;
    spool.next_pending().await.unwrap();
    spool.commit(0).await.unwrap();
    drop(spool);
    flip_byte(&tmp.path().join("checkpoint"), 9);
    let err = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap_err();
    assert!(err.is_corrupt(), "{err}");
}

#[tokio::test]
async fn full_until_a_commit_frees_space() {
    let tmp = tempfile::tempdir().unwrap();
    let config = SpoolConfig::new(tmp.path())
        .max_bytes(2048)
        .segment_bytes(512);
    let spool = Spool::open(config).await.unwrap();
    let mut appended = 0;
    let err = loop {
        match spool.append(&fixed(appended)).await {
            Ok(seq) => assert_eq!(seq, appended),
            Err(e) => break e,
        }
        appended += 1;
        assert!(appended < 100, "never full");
    };
    let frame = frames(&segments(tmp.path())[0])[0].1;
    match err {
        SpoolError::Full { max_bytes, used } => {
            assert_eq!(max_bytes, 2048);
            assert_eq!(used, spool.disk_bytes());
            assert!(
                used <= 2048 && used + frame > 2048 - SEGMENT_HEADER,
                "{used}"
            );
        }
        ref other => panic!("expected Full, got {other}"),
    }
    assert!(err.is_full());
    assert!(spool.disk_bytes() <= 2048);
    // Still full: a failed append takes no space.
    assert!(spool.append(&fixed(appended)).await.unwrap_err().is_full());
    assert_eq!(spool.len(), appended);

    // Replaying the first segment's records and committing them deletes it.
    let first_segment = frames(&segments(tmp.path())[0]).len() as u64;
    for _ in 0..first_segment {
        spool.next_pending().await.unwrap();
    }
    spool.commit(first_segment - 1).await.unwrap();
    assert_eq!(spool.append(&fixed(appended)).await.unwrap(), appended);

    // Committing everything frees everything, the segment being written included.
    let rest = drain(&spool).await;
    spool.commit(rest.last().unwrap().0).await.unwrap();
    assert_eq!(spool.disk_bytes(), 0);
    assert!(segments(tmp.path()).is_empty());
    assert_eq!(spool.append(&fixed(0)).await.unwrap(), appended + 1);
}

#[tokio::test]
async fn record_larger_than_the_bound_is_too_large() {
    let tmp = tempfile::tempdir().unwrap();
    let config = SpoolConfig::new(tmp.path())
        .max_bytes(1024)
        .segment_bytes(512);
    let spool = Spool::open(config).await.unwrap();
    let big = SpoolRecord::new("t", "k", vec![0; 2000]);
    let err = spool.append(&big).await.unwrap_err();
    assert!(
        matches!(
            err,
            SpoolError::TooLarge {
                max_bytes: 1008,
                ..
            }
        ),
        "{err}"
    );
    // Larger than a segment but within the bound: a segment of its own.
    let large = SpoolRecord::new("t", "k", vec![1; 700]);
    assert_eq!(spool.append(&large).await.unwrap(), 0);
    assert_eq!(spool.append(&record(1)).await.unwrap(), 1);
    assert_eq!(segments(tmp.path()).len(), 2);
    assert_eq!(drain(&spool).await[0].1, large);
}

#[tokio::test]
async fn segments_roll_and_committed_ones_are_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let config = SpoolConfig::new(tmp.path()).segment_bytes(256);
    let spool = Spool::open(config.clone()).await.unwrap();
    append_n(&spool, 0..40).await;
    let segs = segments(tmp.path());
    assert!(segs.len() >= 10, "{} segments", segs.len());
    let mut expect_first = 0;
    for seg in &segs {
        assert!(fs::metadata(seg).unwrap().len() <= 256);
        assert_eq!(first_seq_of(seg), expect_first);
        expect_first += frames(seg).len() as u64;
    }
    assert_eq!(expect_first, 40);
    let total: u64 = segs.iter().map(|s| fs::metadata(s).unwrap().len()).sum();
    assert_eq!(spool.disk_bytes(), total);

    for _ in 0..20 {
        spool.next_pending().await.unwrap();
    }
    spool.commit(19).await.unwrap();
    let left = segments(tmp.path());
    // Exactly the segments holding only records 0..=19 are gone.
    let kept: Vec<&PathBuf> = segs
        .iter()
        .zip(segs.iter().skip(1).map(|s| first_seq_of(s)).chain([40]))
        .filter(|(_, end)| *end > 20)
        .map(|(s, _)| s)
        .collect();
    assert_eq!(left.iter().collect::<Vec<_>>(), kept);
    assert!(first_seq_of(&left[0]) <= 20);
    let total: u64 = left.iter().map(|s| fs::metadata(s).unwrap().len()).sum();
    assert_eq!(spool.disk_bytes(), total);

    drop(spool);
    let spool = Spool::open(config).await.unwrap();
    let got = drain(&spool).await;
    assert_eq!(got.first().unwrap().0, 20);
    assert_eq!(got.len(), 20);
    spool.commit(39).await.unwrap();
    assert!(segments(tmp.path()).is_empty());
    assert_eq!(spool.disk_bytes(), 0);
    assert_eq!(spool.append(&record(40)).await.unwrap(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_are_all_acknowledged_and_replayed_once() {
    const TASKS: u64 = 16;
    const EACH: u64 = 500;
    let tmp = tempfile::tempdir().unwrap();
    let config = SpoolConfig::new(tmp.path()).segment_bytes(64 << 10);
    let spool = Spool::open(config).await.unwrap();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let spool = spool.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for j in 0..EACH {
                    let key = format!("t{t}-{j}");
                    let r = SpoolRecord::new("orders", key.clone(), body_for(&key));
                    acked.push((spool.append(&r).await.unwrap(), key));
                }
                acked
            })
        })
        .collect();
    let mut acked = HashMap::new();
    for t in tasks {
        let mine = t.await.unwrap();
        // A task's own appends are numbered in its order.
        assert!(mine.windows(2).all(|w| w[0].0 < w[1].0));
        acked.extend(mine.into_iter().map(|(seq, key)| (key, seq)));
    }
    assert_eq!(acked.len() as u64, TASKS * EACH);
    assert!(segments(tmp.path()).len() > 1);

    let got = drain(&spool).await;
    assert_eq!(got.len() as u64, TASKS * EACH);
    let mut last_j = vec![None; TASKS as usize];
    let mut keys = HashSet::new();
    for (i, (seq, r)) in got.iter().enumerate() {
        assert_eq!(*seq, i as u64);
        assert_eq!(acked[&r.key], *seq);
        assert_eq!(r.body, body_for(&r.key));
        assert!(keys.insert(r.key.clone()), "{} twice", r.key);
        let (t, j) = r.key[1..].split_once('-').unwrap();
        let (t, j): (usize, u64) = (t.parse().unwrap(), j.parse().unwrap());
        assert!(last_j[t] < Some(j), "task {t} out of order");
        last_j[t] = Some(j);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_with_a_batch_delay() {
    let tmp = tempfile::tempdir().unwrap();
    let config = SpoolConfig::new(tmp.path()).batch_delay(Duration::from_millis(2));
    let spool = Spool::open(config).await.unwrap();
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let spool = spool.clone();
            tokio::spawn(async move { (spool.append(&record(i)).await.unwrap(), i) })
        })
        .collect();
    let mut appended = HashMap::new();
    for t in tasks {
        let (seq, i) = t.await.unwrap();
        appended.insert(seq, i);
    }
    let got = drain(&spool).await;
    assert_eq!(got.len(), 32);
    for (n, (seq, r)) in got.iter().enumerate() {
        assert_eq!(*seq, n as u64);
        assert_eq!(*r, record(appended[seq]));
    }
}

#[tokio::test]
async fn a_directory_is_opened_by_one_spool_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
    let err = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap_err();
    assert!(
        matches!(&err, SpoolError::Locked { path } if path == tmp.path()),
        "{err}"
    );
    drop(spool);
    Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
}

#[tokio::test]
async fn closed_spool_refuses_appends_and_still_replays() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = Spool::open(SpoolConfig::new(tmp.path())).await.unwrap();
    append_n(&spool, 0..3).await;
    spool.close().await;
    let err = spool.append(&record(3)).await.unwrap_err();
    assert!(err.is_closed(), "{err}");
    let got = drain(&spool).await;
    assert_eq!(got.len(), 3);
    spool.commit(2).await.unwrap();
    assert!(spool.is_empty());
}

#[tokio::test]
async fn config_values_out_of_range_name_their_field() {
    let tmp = tempfile::tempdir().unwrap();
    let ok = SpoolConfig::new(tmp.path());
    assert!(ok.validate().is_ok());
    let cases = [
        (SpoolConfig::new(""), "dir"),
        (ok.clone().max_bytes(0), "max_bytes"),
        (ok.clone().max_bytes(u64::MAX), "max_bytes"),
        (ok.clone().segment_bytes(0), "segment_bytes"),
        (ok.clone().segment_bytes(63), "segment_bytes"),
        (ok.clone().segment_bytes(u64::MAX), "segment_bytes"),
        (
            ok.clone().max_bytes(4096).segment_bytes(8192),
            "segment_bytes",
        ),
        (
            ok.clone().batch_delay(Duration::from_secs(3600)),
            "batch_delay",
        ),
    ];
    for (config, field) in cases {
        let err = Spool::open(config.clone()).await.unwrap_err();
        assert!(err.is_config());
        match err {
            SpoolError::Config { field: f, why } => {
                assert_eq!(f, field, "{config:?}: {why}");
                assert!(!why.is_empty());
            }
            other => panic!("{config:?}: expected Config, got {other}"),
        }
    }
    // Nothing was created for a config that failed.
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
}

// === a process killed with SIGKILL ===

const CHILD_DIR: &str = "HA_MQ_SPOOL_CHILD_DIR";
const CHILD_MODE: &str = "HA_MQ_SPOOL_CHILD_MODE";
const MARK: &str = "@spool ";

fn crash_config(dir: &Path) -> SpoolConfig {
    SpoolConfig::new(dir).segment_bytes(8 << 10)
}

/// The child process of `killed_while_appending_and_while_replaying_loses_nothing`, which runs
/// this binary again with the environment set; in a normal run it does nothing.
#[test]
fn crash_child() {
    let (Ok(dir), Ok(mode)) = (env::var(CHILD_DIR), env::var(CHILD_MODE)) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Lines go to the real stdout (the test harness captures only print!), one write each,
    // marked: the harness's own `test crash_child ... ` precedes the first without a newline.
    let say = |line: String| writeln!(std::io::stdout(), "{MARK}{line}").unwrap();
    rt.block_on(async move {
        let spool = Spool::open(crash_config(Path::new(&dir))).await.unwrap();
        match mode.as_str() {
            "append" => {
                let tasks: Vec<_> = (0..16)
                    .map(|t| {
                        let spool = spool.clone();
                        tokio::spawn(async move {
                            for j in 0..10_000 {
                                let key = format!("c{t}-{j}");
                                let r = SpoolRecord::new("orders", key.clone(), body_for(&key));
                                let seq = spool.append(&r).await.unwrap();
                                say(format!("acked {seq} {key}"));
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            }
            // "step": after each commit, wait for a line on stdin (the parent kills it there).
            "replay" | "step" => {
                let mut n = 0;
                while let Some((seq, r)) = spool.next_pending().await.unwrap() {
                    assert_eq!(r.body, body_for(&r.key));
                    say(format!("read {seq} {}", r.key));
                    n += 1;
                    if n % 50 == 0 {
                        spool.commit(seq).await.unwrap();
                        say(format!("committed {seq}"));
                        if mode == "step" {
                            std::io::stdin().read_line(&mut String::new()).unwrap();
                        }
                    }
                }
            }
            other => panic!("unknown child mode {other}"),
        }
        say("done".into());
    });
}

/// What the parent does on a line of the child's.
#[derive(PartialEq)]
enum Step {
    Read,
    /// Let a stepping child go on.
    Answer,
    Kill,
}

/// Runs `crash_child` in `mode` until `on_line` says to kill it with SIGKILL; returns every line
/// it printed. The child writes to a pipe: once the pipe is full it blocks, so it cannot run
/// far past the line the kill was decided on.
fn run_child(dir: &Path, mode: &str, mut on_line: impl FnMut(&str) -> Step) -> Vec<String> {
    let mut child = Command::new(env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .env(CHILD_MODE, mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    let mut killed = false;
    for line in stdout.lines() {
        let line = line.unwrap();
        if !killed {
            match on_line(&line) {
                Step::Read => {}
                Step::Answer => stdin.write_all(b"go\n").unwrap(),
                Step::Kill => {
                    child.kill().unwrap();
                    killed = true;
                }
            }
        }
        lines.push(line);
    }
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{mode} child: {status}");
    assert!(
        !lines.iter().any(|l| l.ends_with("@spool done")),
        "{mode} child finished before the kill"
    );
    lines
}

/// The child's lines in `lines` (see `MARK`) that start with `tag`, as (sequence number, key).
fn parse<'a>(lines: &'a [String], tag: &str) -> Vec<(u64, &'a str)> {
    lines
        .iter()
        .filter_map(|l| {
            let (_, said) = l.split_once(MARK)?;
            let rest = said.strip_prefix(tag)?.strip_prefix(' ')?;
            let (seq, key) = rest.split_once(' ').unwrap_or((rest, ""));
            Some((seq.parse().ok()?, key))
        })
        .collect()
}

/// Kills on the `n`th line of the child's with `tag`, answering the ones before.
fn on_nth(tag: &'static str, n: usize) -> impl FnMut(&str) -> Step {
    let mut seen = 0;
    move |line| {
        if !line.contains(&format!("{MARK}{tag} ")) {
            return Step::Read;
        }
        seen += 1;
        if seen == n { Step::Kill } else { Step::Answer }
    }
}

#[test]
fn killed_while_appending_and_while_replaying_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // 1. Killed in the middle of appending, with appends in flight.
    let appended = run_child(dir, "append", on_nth("acked", 6000));
    let acked = parse(&appended, "acked");
    assert!(acked.len() >= 6000);

    // 2. Killed in the middle of replaying, at some point after its third commit (it runs on
    // until the kill lands: reading, committing, deleting segments).
    let replayed = run_child(dir, "replay", on_nth("committed", 3));
    let read2: HashMap<u64, &str> = parse(&replayed, "read").into_iter().collect();
    let committed2 = parse(&replayed, "committed").last().unwrap().0;
    assert_eq!(committed2 % 50, 49);

    // 3. Killed just after a commit returned, the exact commit point known.
    let stepped = run_child(dir, "step", on_nth("committed", 2));
    let read3: HashMap<u64, &str> = parse(&stepped, "read").into_iter().collect();
    let start3 = *read3.keys().min().unwrap();
    let committed3 = parse(&stepped, "committed").last().unwrap().0;
    // At least once: 3 resumed after 2's last commit that it saw return, or a later one 2
    // made before the kill, and never past a record 2 did not read.
    assert!(
        start3 > committed2,
        "committed record {committed2} replayed"
    );
    assert_eq!(
        start3 % 50,
        0,
        "{start3} is not just after one of 2's commits"
    );
    assert!(
        read2.contains_key(&(start3 - 1)),
        "3 skipped records 2 never read"
    );
    assert_eq!(committed3, start3 + 99);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rest = rt.block_on(async {
        let spool = Spool::open(crash_config(dir)).await.unwrap();
        let rest = drain(&spool).await;
        spool.commit(rest.last().unwrap().0).await.unwrap();
        rest
    });
    // Exactly after the last commit, in order, to the end, no gap and no garbage.
    assert_eq!(rest[0].0, committed3 + 1);
    for (i, (seq, r)) in rest.iter().enumerate() {
        assert_eq!(*seq, committed3 + 1 + i as u64);
        assert_eq!(r.body, body_for(&r.key));
    }
    let rest: HashMap<u64, &str> = rest.iter().map(|(s, r)| (*s, r.key.as_str())).collect();
    // Every acknowledged record was replayed under its number: by 2 and committed there, by 3
    // up to its last commit, or now.
    for (seq, key) in acked {
        let found = if seq < start3 {
            read2.get(&seq)
        } else if seq <= committed3 {
            read3.get(&seq)
        } else {
            rest.get(&seq)
        };
        assert_eq!(found, Some(&key), "acknowledged record {seq} ({key}) lost");
    }
}
