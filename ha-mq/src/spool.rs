//! A durable local spool: an append-only on-disk queue for the messages that no RocketMQ cluster
//! could take.
//!
//! When every cluster is down the producer appends each message here; [`Spool::append`] resolves
//! only once the record is on disk (`fdatasync`), so an acknowledged message survives a crash of
//! the process or of the machine. A replayer later reads the records in append order with
//! [`Spool::next_pending`], sends them, and marks them done with [`Spool::commit`], which writes a
//! checkpoint durably and deletes the segment files that hold only committed records.
//!
//! Guarantees:
//! - **Durable when acknowledged**: `append` returns `Ok(seq)` only after the write that holds the
//!   record, and the creation of its segment file, were fsynced. Appends that queue up while the
//!   writer is in an fsync share the next one (group commit), which is what makes the spool fast.
//! - **At least once**: a committed record is never handed out again (the checkpoint is written
//!   before `commit` returns); a record handed out but not committed is handed out again after a
//!   crash or a [`Spool::rewind`], so a replayer may send it twice (the key is the dedupe key).
//! - **No garbage**: every record carries its length, a CRC-32 (IEEE) over the length and the
//!   payload, and its sequence number. On open, a damaged record at the end of
//!   the newest segment is a *torn tail* (a crash mid-write, never acknowledged) and is cut off;
//!   any other damage is reported as [`SpoolError::Corrupt`], never skipped.
//!
//! # On-disk format
//!
//! A directory holding:
//! - `lock`: held with an exclusive `flock` while a [`Spool`] is open on the directory;
//! - `checkpoint`: 24 bytes, `b"HASPCKP1"`, the first uncommitted sequence number (`u64` LE), the
//!   CRC-32 of those 16 bytes (`u32` LE) and 4 zero bytes; replaced atomically (write
//!   `checkpoint.tmp`, fsync, rename, fsync the directory);
//! - segments `{first_seq:020}.seg`: a 16-byte header, `b"HASPSEG1"` and the sequence number of
//!   the segment's first record (`u64` LE), then frames back to back. A frame is
//!   `len: u32 LE | crc: u32 LE | payload (len bytes)` with `crc` = CRC-32 of the `len` bytes and the
//!   payload; the payload is `seq: u64 | flags: u8 | topic | key | tags | body | properties`,
//!   strings and byte strings as `u32` length + bytes, `tags` as `0` or `1` + string, properties
//!   as a `u32` count of key/value string pairs. All integers are little-endian.
//!
//! Flag bit 0 marks the first frame of each write (one `write` + `fdatasync`). A write that was
//! fsynced is complete on disk, so damage can only be a torn tail if no intact write starts after
//! it: recovery looks for one, and if it finds one the damage is in acknowledged data
//! ([`SpoolError::Corrupt`]). Damage inside the newest write cannot be told from a torn write:
//! the damaged frame and the rest of that write are dropped.
//!
//! Sequence numbers increase across reopens (the checkpoint keeps them going when every segment
//! was deleted); only those of a torn tail, never acknowledged, are used again.
//!
//! # Example
//!
//! ```
//! use ha_mq::spool::{Spool, SpoolConfig, SpoolRecord};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let tmp = tempfile::tempdir()?;
//! # let dir = tmp.path();
//! let spool = Spool::open(SpoolConfig::new(dir).max_bytes(64 << 20)).await?;
//!
//! // No cluster answers: keep the message; `Ok` means it is on disk.
//! let record = SpoolRecord::new("orders", "order-42", &b"{\"id\":42}"[..]).tags("created");
//! let seq = spool.append(&record).await?;
//!
//! // A cluster is back: replay in order, then mark what was sent (a commit costs two fsyncs:
//! // a real replayer commits every few hundred records).
//! while let Some((seq, record)) = spool.next_pending().await? {
//!     // send `record` to the cluster here; on failure `spool.rewind().await` and retry later
//!     spool.commit(seq).await?;
//! }
//! assert!(spool.is_empty());
//! # let _ = seq;
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;
// The writer thread runs outside any runtime, where tokio's `Instant` is the system clock; it is
// used so the workspace's one-clock rule (`.clippy.toml`) holds here too.
use tokio::time::Instant;

const SEGMENT_MAGIC: &[u8; 8] = b"HASPSEG1";
const CHECKPOINT_MAGIC: &[u8; 8] = b"HASPCKP1";
const SEGMENT_HEADER: u64 = 16;
const CHECKPOINT_LEN: usize = 24;
const CHECKPOINT_FILE: &str = "checkpoint";
const CHECKPOINT_TMP: &str = "checkpoint.tmp";
const LOCK_FILE: &str = "lock";
const SEGMENT_SUFFIX: &str = ".seg";

/// `len` and `crc`.
const FRAME_HEADER: usize = 8;
/// Where the sequence number and the flags sit in a frame.
const SEQ_AT: usize = FRAME_HEADER;
const FLAGS_AT: usize = FRAME_HEADER + 8;
/// The smallest payload: seq, flags, empty topic and key, no tags, empty body, no properties.
const MIN_PAYLOAD: usize = 8 + 1 + 4 + 4 + 1 + 4 + 4;
/// Flag: this frame starts a write (see the module docs).
const FLAG_WRITE_START: u8 = 1;

/// The smallest `segment_bytes`: a header and one small record.
pub const MIN_SEGMENT_BYTES: u64 = 64;
/// The largest `segment_bytes` (1 GiB): larger segments free space in steps too coarse to be
/// useful, and recovery reads the damaged tail of the newest one into memory.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;
/// The largest `max_bytes` (2^62 bytes): anything near it is a unit mistake, and sizes stay far
/// from overflowing a file offset.
pub const MAX_SPOOL_BYTES: u64 = 1 << 62;
/// The largest `batch_delay` (1 s): every append waits up to this long for its acknowledgement.
pub const MAX_BATCH_DELAY: Duration = Duration::from_secs(1);

/// One write carries at most this many bytes of records (more wait for the next write), which
/// bounds a torn tail, the writer's buffer and an append's wait behind a large batch.
const MAX_WRITE_BYTES: usize = 8 << 20;
/// How many times in a row the writer yields its core with nothing new arriving before it
/// writes what it has: 64 filled every write with 64 closed-loop appenders in the bench, where 0 left it alternating
/// between a few records and the rest (~35 a write); a yield with no other thread waiting
/// costs well under a microsecond.
const MAX_YIELDS: u32 = 64;
/// The replayer reads ahead this much per blocking read.
const READ_AHEAD_BYTES: u64 = 1 << 20;
const READ_AHEAD_RECORDS: usize = 512;

// === SpoolError ===

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// A file operation failed.
    #[error("spool i/o on {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The record would take the spool past `max_bytes`; committing replayed records frees
    /// space (a segment at a time).
    #[error("spool full: {used} of {max_bytes} bytes used")]
    Full {
        /// The configured bound.
        max_bytes: u64,
        /// Bytes the spool's segment files take (or will take once the writes in flight land).
        used: u64,
    },
    /// The record can never fit: larger than `max_bytes` with a segment header, or than the
    /// format's 4 GiB frame.
    #[error("record of {bytes} bytes can never fit (at most {max_bytes})")]
    TooLarge {
        /// The encoded record's size.
        bytes: u64,
        /// The largest record that fits.
        max_bytes: u64,
    },
    /// Acknowledged data is damaged (not a torn tail): the spool refuses to skip it.
    #[error("spool corrupt: {} at byte {offset}: {why}", path.display())]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// Where the damage starts.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// A [`SpoolConfig`] field is out of range.
    #[error("spool config: {field} {why}")]
    Config {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// Another [`Spool`] (in this process or another) has the directory open.
    #[error("spool directory {} is locked by another spool", path.display())]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// `commit(seq)` for a record [`Spool::next_pending`] has not handed out.
    #[error("cannot commit {seq}: only records before {read_end} were handed out")]
    NotRead {
        /// The sequence number passed to `commit`.
        seq: u64,
        /// One past the last record handed out.
        read_end: u64,
    },
    /// The spool was closed, or its writer stopped after an i/o error it could not undo (logged).
    #[error("spool closed")]
    Closed,
}

impl SpoolError {
    /// The spool is full (retry after the replayer has committed).
    pub fn is_full(&self) -> bool {
        matches!(self, Self::Full { .. })
    }

    /// Acknowledged data is damaged.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Self::Corrupt { .. })
    }

    /// The spool no longer takes appends.
    pub fn is_closed(&self) -> bool {
        matches!(self, Self::Closed)
    }

    /// A config field is out of range.
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config { .. })
    }

    /// The same error again, for answering every appender of a failed write (`io::Error` is not
    /// `Clone`: its kind and message are kept).
    fn duplicate(&self) -> Self {
        match self {
            Self::Io { path, source } => Self::Io {
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            Self::Full { max_bytes, used } => Self::Full {
                max_bytes: *max_bytes,
                used: *used,
            },
            Self::TooLarge { bytes, max_bytes } => Self::TooLarge {
                bytes: *bytes,
                max_bytes: *max_bytes,
            },
            Self::Corrupt { path, offset, why } => Self::Corrupt {
                path: path.clone(),
                offset: *offset,
                why: why.clone(),
            },
            Self::Config { field, why } => Self::Config {
                field,
                why: why.clone(),
            },
            Self::Locked { path } => Self::Locked { path: path.clone() },
            Self::NotRead { seq, read_end } => Self::NotRead {
                seq: *seq,
                read_end: *read_end,
            },
            Self::Closed => Self::Closed,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, offset: u64, why: impl Into<String>) -> SpoolError {
    SpoolError::Corrupt {
        path: path.to_path_buf(),
        offset,
        why: why.into(),
    }
}

fn join_err(path: &Path, e: tokio::task::JoinError) -> SpoolError {
    SpoolError::Io {
        path: path.to_path_buf(),
        source: io::Error::other(format!("spool blocking task failed: {e}")),
    }
}

// === SpoolConfig ===

/// Where the spool lives and how large it may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SpoolConfig {
    /// The spool's directory, created if missing; one [`Spool`] at a time may have it open.
    pub dir: PathBuf,
    /// Bound on the segment files' total size on disk (default 1 GiB). An append that would
    /// exceed it fails with [`SpoolError::Full`]. Committed records free space only when their
    /// whole segment is deleted, so keep this several times `segment_bytes`.
    pub max_bytes: u64,
    /// A segment file is closed and a new one started when the next record would take it past
    /// this size (default 64 MiB; [`MIN_SEGMENT_BYTES`]..=[`MAX_SEGMENT_BYTES`], at most
    /// `max_bytes`). A single larger record gets a segment of its own.
    pub segment_bytes: u64,
    /// How long the writer waits, after the first append of a batch arrives, for more to share
    /// its fsync (default zero: it fsyncs as soon as it is free, with every append that queued
    /// meanwhile, which already batches under load; at most [`MAX_BATCH_DELAY`]).
    pub batch_delay: Duration,
}

impl SpoolConfig {
    /// A config for `dir` with the defaults: `max_bytes` 1 GiB, `segment_bytes` 64 MiB,
    /// `batch_delay` zero.
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            batch_delay: Duration::ZERO,
        }
    }

    /// Sets [`max_bytes`](Self::max_bytes).
    #[must_use]
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Sets [`segment_bytes`](Self::segment_bytes).
    #[must_use]
    pub fn segment_bytes(mut self, segment_bytes: u64) -> Self {
        self.segment_bytes = segment_bytes;
        self
    }

    /// Sets [`batch_delay`](Self::batch_delay).
    #[must_use]
    pub fn batch_delay(mut self, batch_delay: Duration) -> Self {
        self.batch_delay = batch_delay;
        self
    }

    /// Checks every field; [`Spool::open`] calls it.
    pub fn validate(&self) -> Result<(), SpoolError> {
        let bad = |field, why: String| Err(SpoolError::Config { field, why });
        if self.dir.as_os_str().is_empty() {
            return bad("dir", "must not be empty".into());
        }
        if self.max_bytes == 0 {
            return bad("max_bytes", "must be positive".into());
        }
        if self.max_bytes > MAX_SPOOL_BYTES {
            return bad(
                "max_bytes",
                format!("{} exceeds the largest {MAX_SPOOL_BYTES}", self.max_bytes),
            );
        }
        if self.segment_bytes < MIN_SEGMENT_BYTES {
            return bad(
                "segment_bytes",
                format!(
                    "{} is below the smallest {MIN_SEGMENT_BYTES}",
                    self.segment_bytes
                ),
            );
        }
        if self.segment_bytes > MAX_SEGMENT_BYTES {
            return bad(
                "segment_bytes",
                format!(
                    "{} exceeds the largest {MAX_SEGMENT_BYTES}",
                    self.segment_bytes
                ),
            );
        }
        if self.segment_bytes > self.max_bytes {
            return bad(
                "segment_bytes",
                format!(
                    "{} exceeds max_bytes ({})",
                    self.segment_bytes, self.max_bytes
                ),
            );
        }
        if self.batch_delay > MAX_BATCH_DELAY {
            return bad(
                "batch_delay",
                format!(
                    "{:?} exceeds the longest {MAX_BATCH_DELAY:?}",
                    self.batch_delay
                ),
            );
        }
        Ok(())
    }
}

// === SpoolRecord ===

/// One spooled message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpoolRecord {
    /// The RocketMQ topic.
    pub topic: String,
    /// The message key, also its dedupe key on replay.
    pub key: String,
    /// The message tags.
    pub tags: Option<String>,
    /// The message body.
    pub body: Bytes,
    /// User properties, in order.
    pub properties: Vec<(String, String)>,
}

impl SpoolRecord {
    /// A record with no tags and no properties.
    #[must_use]
    pub fn new(topic: impl Into<String>, key: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            key: key.into(),
            tags: None,
            body: body.into(),
            properties: Vec::new(),
        }
    }

    /// Sets the tags.
    #[must_use]
    pub fn tags(mut self, tags: impl Into<String>) -> Self {
        self.tags = Some(tags.into());
        self
    }

    /// Adds a property.
    #[must_use]
    pub fn property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.push((key.into(), value.into()));
        self
    }
}

// === frames ===

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn frame_crc(len: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(payload);
    h.finalize()
}

/// The largest frame the format holds.
const MAX_FRAME: u64 = FRAME_HEADER as u64 + u32::MAX as u64;

/// Encodes `record` as a frame whose sequence number, flags and CRC the writer fills in
/// ([`seal`]), so the encoding happens on the appender's task, not on the one writer thread.
fn encode(record: &SpoolRecord) -> Result<Vec<u8>, SpoolError> {
    let strings = |s: &str| 4 + s.len() as u64;
    let mut payload = 8
        + 1
        + strings(&record.topic)
        + strings(&record.key)
        + 1
        + record.tags.as_deref().map_or(0, strings)
        + 4
        + record.body.len() as u64
        + 4;
    for (k, v) in &record.properties {
        payload += strings(k) + strings(v);
    }
    let Ok(len) = u32::try_from(payload) else {
        return Err(SpoolError::TooLarge {
            bytes: FRAME_HEADER as u64 + payload,
            max_bytes: MAX_FRAME,
        });
    };
    let put = |buf: &mut Vec<u8>, b: &[u8]| {
        // Every part is shorter than the payload, which fits a u32.
        buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
        buf.extend_from_slice(b);
    };
    let mut buf = Vec::with_capacity(FRAME_HEADER + len as usize);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0; 4]); // crc
    buf.extend_from_slice(&[0; 8]); // seq
    buf.push(0); // flags
    put(&mut buf, record.topic.as_bytes());
    put(&mut buf, record.key.as_bytes());
    match &record.tags {
        None => buf.push(0),
        Some(tags) => {
            buf.push(1);
            put(&mut buf, tags.as_bytes());
        }
    }
    put(&mut buf, &record.body);
    buf.extend_from_slice(&(record.properties.len() as u32).to_le_bytes());
    for (k, v) in &record.properties {
        put(&mut buf, k.as_bytes());
        put(&mut buf, v.as_bytes());
    }
    debug_assert_eq!(buf.len(), FRAME_HEADER + len as usize);
    Ok(buf)
}

/// Fills in an encoded frame's sequence number, flags and CRC.
fn seal(frame: &mut [u8], seq: u64, flags: u8) {
    frame[SEQ_AT..SEQ_AT + 8].copy_from_slice(&seq.to_le_bytes());
    frame[FLAGS_AT] = flags;
    let crc = frame_crc(&frame[..4], &frame[FRAME_HEADER..]);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// A frame's payload, decoded.
struct Decoded {
    seq: u64,
    record: SpoolRecord,
}

struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let end = self.pos.checked_add(n).ok_or("length overflows")?;
        let b = self
            .buf
            .get(self.pos..end)
            .ok_or("field runs past the payload")?;
        self.pos = end;
        Ok(b)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(le_u32(self.take(4)?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], &'static str> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, &'static str> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "string is not UTF-8")
    }
}

/// Decodes a payload whose CRC matched; an error here is a bug or a CRC collision, never a
/// torn write.
fn decode(payload: &[u8]) -> Result<Decoded, &'static str> {
    let mut c = Fields {
        buf: payload,
        pos: 0,
    };
    let seq = le_u64(c.take(8)?);
    let _flags = c.u8()?;
    let topic = c.string()?;
    let key = c.string()?;
    let tags = match c.u8()? {
        0 => None,
        1 => Some(c.string()?),
        _ => return Err("bad tags marker"),
    };
    let body = Bytes::copy_from_slice(c.bytes()?);
    let n = c.u32()? as usize;
    let mut properties = Vec::with_capacity(n.min(payload.len() / 8));
    for _ in 0..n {
        properties.push((c.string()?, c.string()?));
    }
    if c.pos != payload.len() {
        return Err("trailing bytes after the record");
    }
    Ok(Decoded {
        seq,
        record: SpoolRecord {
            topic,
            key,
            tags,
            body,
            properties,
        },
    })
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}{SEGMENT_SUFFIX}"))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

fn segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER as usize] {
    let mut h = [0; SEGMENT_HEADER as usize];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..].copy_from_slice(&first_seq.to_le_bytes());
    h
}

fn check_segment_header(path: &Path, h: &[u8], first_seq: u64) -> Result<(), SpoolError> {
    if &h[..8] != SEGMENT_MAGIC {
        return Err(corrupt(path, 0, "not a spool segment (bad magic)"));
    }
    let found = le_u64(&h[8..16]);
    if found != first_seq {
        return Err(corrupt(
            path,
            8,
            format!("header says the first record is {found}, the name says {first_seq}"),
        ));
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn remove_if_exists(path: &Path) -> Result<(), SpoolError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

// === checkpoint ===

fn write_checkpoint(dir: &Path, committed: u64) -> Result<(), SpoolError> {
    let mut buf = [0; CHECKPOINT_LEN];
    buf[..8].copy_from_slice(CHECKPOINT_MAGIC);
    buf[8..16].copy_from_slice(&committed.to_le_bytes());
    let crc = crc32fast::hash(&buf[..16]);
    buf[16..20].copy_from_slice(&crc.to_le_bytes());
    let tmp = dir.join(CHECKPOINT_TMP);
    File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(&buf)?;
            f.sync_all()
        })
        .map_err(io_err(&tmp))?;
    let path = dir.join(CHECKPOINT_FILE);
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)
}

fn read_checkpoint(dir: &Path) -> Result<Option<u64>, SpoolError> {
    let path = dir.join(CHECKPOINT_FILE);
    let buf = match fs::read(&path) {
        Ok(buf) => buf,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    if buf.len() != CHECKPOINT_LEN || &buf[..8] != CHECKPOINT_MAGIC {
        return Err(corrupt(&path, 0, "not a spool checkpoint"));
    }
    if crc32fast::hash(&buf[..16]) != le_u32(&buf[16..20]) {
        return Err(corrupt(&path, 16, "checkpoint checksum mismatch"));
    }
    Ok(Some(le_u64(&buf[8..16])))
}

// === recovery ===

/// A segment's durable extent, shared by the writer (who extends it) and the replayer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SegMeta {
    first_seq: u64,
    /// One past its last durable record.
    end_seq: u64,
    /// Its size up to the end of that record.
    durable_len: u64,
}

struct Recovered {
    lock: File,
    segments: Vec<SegMeta>,
    active: Option<Active>,
    committed: u64,
    next_seq: u64,
}

fn recover(dir: &Path) -> Result<Recovered, SpoolError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let lock_path = dir.join(LOCK_FILE);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            return Err(SpoolError::Locked {
                path: dir.to_path_buf(),
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
    }
    remove_if_exists(&dir.join(CHECKPOINT_TMP))?;
    let checkpoint = read_checkpoint(dir)?;

    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if let Some(first) = entry.file_name().to_str().and_then(parse_segment_name) {
            names.push(first);
        }
    }
    names.sort_unstable();

    let mut segments: Vec<SegMeta> = Vec::new();
    for (i, &first) in names.iter().enumerate() {
        let path = segment_path(dir, first);
        let next = names.get(i + 1).copied();
        // Wholly committed (the next segment starts at or before the checkpoint): a crash came
        // between the checkpoint and the deletion.
        if let (Some(c), Some(next)) = (checkpoint, next)
            && next <= c
        {
            remove_if_exists(&path)?;
            continue;
        }
        let Some(meta) = scan_segment(&path, first, next.is_none())? else {
            continue;
        };
        if let Some(prev) = segments.last()
            && prev.end_seq != first
        {
            return Err(corrupt(
                &path,
                0,
                format!(
                    "segment starts at record {first} but the one before ends at {}",
                    prev.end_seq
                ),
            ));
        }
        segments.push(meta);
    }

    let committed = checkpoint.unwrap_or(0);
    if let Some(first) = segments.first()
        && first.first_seq > committed
    {
        return Err(corrupt(
            &segment_path(dir, first.first_seq),
            0,
            format!(
                "records {committed}..{} are missing (first uncommitted is {committed})",
                first.first_seq
            ),
        ));
    }
    if let Some(last) = segments.last()
        && last.end_seq < committed
    {
        tracing::warn!(
            dir = %dir.display(),
            committed,
            end = last.end_seq,
            "spool checkpoint is past the last record; dropping the spool's segments"
        );
    }
    while let Some(first) = segments.first().copied()
        && first.end_seq <= committed
    {
        remove_if_exists(&segment_path(dir, first.first_seq))?;
        segments.remove(0);
    }
    let next_seq = segments.last().map_or(committed, |m| m.end_seq);
    let active = match segments.last() {
        Some(meta) => {
            let path = segment_path(dir, meta.first_seq);
            let mut file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            file.seek(SeekFrom::Start(meta.durable_len))
                .map_err(io_err(&path))?;
            Some(Active {
                first_seq: meta.first_seq,
                path,
                file,
                len: meta.durable_len,
            })
        }
        None => None,
    };
    Ok(Recovered {
        lock,
        segments,
        active,
        committed,
        next_seq,
    })
}

/// Reads a frame's payload during recovery: `Ok(Err(why))` for a damaged frame.
fn read_frame(
    r: &mut impl Read,
    offset: u64,
    file_len: u64,
) -> io::Result<Result<Vec<u8>, String>> {
    let avail = file_len - offset;
    if avail < FRAME_HEADER as u64 {
        return Ok(Err(format!(
            "{avail} bytes left, too few for a frame header"
        )));
    }
    let mut header = [0; FRAME_HEADER];
    r.read_exact(&mut header)?;
    let len = le_u32(&header[..4]);
    if (len as usize) < MIN_PAYLOAD {
        return Ok(Err(format!("frame length {len} is too small")));
    }
    if u64::from(len) > avail - FRAME_HEADER as u64 {
        return Ok(Err(format!(
            "frame of {len} bytes runs past the end of the file"
        )));
    }
    let mut payload = vec![0; len as usize];
    r.read_exact(&mut payload)?;
    if frame_crc(&header[..4], &payload) != le_u32(&header[4..8]) {
        return Ok(Err("frame checksum mismatch".into()));
    }
    Ok(Ok(payload))
}

/// Checks every frame of a segment. The newest segment (`last`) may end in a torn write, which
/// is cut off; `None` if it is an empty file left by a crash while it was being created.
fn scan_segment(path: &Path, first_seq: u64, last: bool) -> Result<Option<SegMeta>, SpoolError> {
    let file = OpenOptions::new()
        .read(true)
        .write(last)
        .open(path)
        .map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    // A segment is created, its header written and fsynced, before any record goes in: the
    // newest one with no whole header was torn while it was being created.
    let torn_creation = |file: File| {
        tracing::warn!(path = %path.display(), "removing a spool segment torn while created");
        drop(file);
        remove_if_exists(path).map(|()| None)
    };
    if file_len < SEGMENT_HEADER {
        if last {
            return torn_creation(file);
        }
        return Err(corrupt(path, 0, "segment shorter than its header"));
    }
    let mut header = [0; SEGMENT_HEADER as usize];
    file.read_exact_at(&mut header, 0).map_err(io_err(path))?;
    if let Err(e) = check_segment_header(path, &header, first_seq) {
        if last && file_len == SEGMENT_HEADER {
            return torn_creation(file);
        }
        return Err(e);
    }

    let mut r = BufReader::with_capacity(1 << 20, &file);
    r.seek(SeekFrom::Start(SEGMENT_HEADER))
        .map_err(io_err(path))?;
    let mut offset = SEGMENT_HEADER;
    let mut expected = first_seq;
    while offset < file_len {
        let payload = match read_frame(&mut r, offset, file_len).map_err(io_err(path))? {
            Ok(payload) => payload,
            Err(why) if last => {
                cut_torn_tail(&file, path, offset, file_len, expected, why)?;
                break;
            }
            Err(why) => return Err(corrupt(path, offset, why)),
        };
        let decoded = decode(&payload).map_err(|why| corrupt(path, offset, why))?;
        if decoded.seq != expected {
            return Err(corrupt(
                path,
                offset,
                format!("record {} where {expected} was expected", decoded.seq),
            ));
        }
        offset += (FRAME_HEADER + payload.len()) as u64;
        expected += 1;
    }
    Ok(Some(SegMeta {
        first_seq,
        end_seq: expected,
        durable_len: offset,
    }))
}

/// Damage at `bad_at` in the newest segment: a torn tail unless an intact write starts after it.
fn cut_torn_tail(
    file: &File,
    path: &Path,
    bad_at: u64,
    file_len: u64,
    expected: u64,
    why: String,
) -> Result<(), SpoolError> {
    let mut rest = vec![0; (file_len - bad_at) as usize];
    file.read_exact_at(&mut rest, bad_at)
        .map_err(io_err(path))?;
    if let Some(at) = find_write_start(&rest, expected) {
        return Err(corrupt(
            path,
            bad_at,
            format!(
                "{why}; an intact later write starts at byte {}, so this is acknowledged data, not a torn tail",
                bad_at + at as u64
            ),
        ));
    }
    tracing::warn!(
        path = %path.display(),
        offset = bad_at,
        dropped_bytes = file_len - bad_at,
        why,
        "cutting a torn tail off the spool (a crash during a write that was never acknowledged)"
    );
    file.set_len(bad_at).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

/// The offset in `rest` of an intact frame that starts a write, with a sequence number that can
/// follow `expected`.
fn find_write_start(rest: &[u8], expected: u64) -> Option<usize> {
    (1..rest.len()).find(|&y| {
        let Some(head) = rest.get(y..y + FLAGS_AT + 1) else {
            return false;
        };
        let len = le_u32(head) as usize;
        let end = y + FRAME_HEADER + len;
        if len < MIN_PAYLOAD || end > rest.len() || head[FLAGS_AT] & FLAG_WRITE_START == 0 {
            return false;
        }
        let seq = le_u64(&head[SEQ_AT..]);
        if seq < expected || seq - expected > rest.len() as u64 {
            return false;
        }
        frame_crc(&head[..4], &rest[y + FRAME_HEADER..end]) == le_u32(&head[4..8])
    })
}

// === writer ===

enum Cmd {
    Append {
        frame: Vec<u8>,
        reply: oneshot::Sender<Result<u64, SpoolError>>,
    },
    /// Delete the segments wholly before `committed` (the checkpoint already says so).
    Release {
        committed: u64,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

impl Cmd {
    fn bytes(&self) -> usize {
        match self {
            Self::Append { frame, .. } => frame.len(),
            _ => 0,
        }
    }
}

/// What the writer publishes and the handles read.
struct Shared {
    /// The durable segments in order, the active one last.
    segments: Mutex<Vec<SegMeta>>,
    /// One past the last durable record.
    durable_end: AtomicU64,
    /// The first uncommitted record.
    committed: AtomicU64,
    disk_bytes: AtomicU64,
}

struct Active {
    first_seq: u64,
    path: PathBuf,
    file: File,
    /// Its durable size; writes are appended here.
    len: u64,
}

/// The one thread that writes and fsyncs segments; appends reach it through a channel, and all
/// those that queued during an fsync go into the next write.
struct Writer {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    batch_delay: Duration,
    shared: Arc<Shared>,
    active: Option<Active>,
    next_seq: u64,
    disk_bytes: u64,
    /// Frames staged for the next write, and who waits for them.
    buf: Vec<u8>,
    acks: Vec<(oneshot::Sender<Result<u64, SpoolError>>, u64)>,
    /// A failed write could not be undone: no more appends.
    broken: bool,
    closing: bool,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        let mut batch = Vec::new();
        while !self.closing {
            let Ok(first) = rx.recv() else { break };
            let mut bytes = first.bytes();
            batch.push(first);
            if !self.batch_delay.is_zero() {
                let deadline = Instant::now() + self.batch_delay;
                while bytes < MAX_WRITE_BYTES {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let Ok(cmd) = rx.recv_timeout(left) else {
                        break;
                    };
                    bytes += cmd.bytes();
                    batch.push(cmd);
                }
            }
            // Appenders acknowledged by the last write come back one by one; yielding the
            // core while they keep arriving lets them into this write instead of the next
            // (without it, writes alternate between a few records and all the rest).
            let mut yields = 0;
            while bytes < MAX_WRITE_BYTES {
                match rx.try_recv() {
                    Ok(cmd) => {
                        bytes += cmd.bytes();
                        batch.push(cmd);
                        yields = 0;
                    }
                    Err(_) if yields < MAX_YIELDS => {
                        yields += 1;
                        thread::yield_now();
                    }
                    Err(_) => break,
                }
            }
            self.process(&mut batch);
        }
    }

    fn process(&mut self, batch: &mut Vec<Cmd>) {
        let mut release = None;
        let mut release_replies = Vec::new();
        let mut close_replies = Vec::new();
        let mut write_start = true;
        for cmd in batch.drain(..) {
            match cmd {
                Cmd::Append { frame, reply } => {
                    if self.closing || self.broken {
                        let _ = reply.send(Err(SpoolError::Closed));
                    } else {
                        self.stage(frame, reply, &mut write_start);
                    }
                }
                Cmd::Release { committed, reply } => {
                    release = release.max(Some(committed));
                    release_replies.push(reply);
                }
                Cmd::Close { reply } => {
                    self.closing = true;
                    close_replies.push(reply);
                }
            }
        }
        self.flush();
        if let Some(committed) = release {
            let result = self.release(committed);
            for reply in release_replies {
                let _ = reply.send(result.as_ref().map(|_| ()).map_err(SpoolError::duplicate));
            }
        }
        if self.closing {
            self.active = None;
            for reply in close_replies {
                let _ = reply.send(());
            }
        }
    }

    fn stage(
        &mut self,
        mut frame: Vec<u8>,
        reply: oneshot::Sender<Result<u64, SpoolError>>,
        write_start: &mut bool,
    ) {
        let len = frame.len() as u64;
        let staged = self.buf.len() as u64;
        let roll = self.active.as_ref().is_none_or(|a| {
            a.len + staged > SEGMENT_HEADER && a.len + staged + len > self.segment_bytes
        });
        let header = if roll { SEGMENT_HEADER } else { 0 };
        let used = self.disk_bytes + staged;
        if used + header + len > self.max_bytes {
            let _ = reply.send(Err(SpoolError::Full {
                max_bytes: self.max_bytes,
                used,
            }));
            return;
        }
        if roll {
            self.flush();
            if self.broken {
                let _ = reply.send(Err(SpoolError::Closed));
                return;
            }
            if let Err(e) = self.roll() {
                let _ = reply.send(Err(e));
                return;
            }
            *write_start = true;
        }
        let seq = self.next_seq;
        let flags = if *write_start { FLAG_WRITE_START } else { 0 };
        seal(&mut frame, seq, flags);
        *write_start = false;
        self.buf.extend_from_slice(&frame);
        self.acks.push((reply, seq));
        self.next_seq += 1;
    }

    /// Writes and fsyncs the staged frames, then acknowledges them.
    fn flush(&mut self) {
        if self.acks.is_empty() {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            // `stage` rolls to a segment before staging anything.
            for (reply, _) in self.acks.drain(..) {
                let _ = reply.send(Err(SpoolError::Closed));
            }
            self.buf.clear();
            return;
        };
        let written = active
            .file
            .write_all(&self.buf)
            .and_then(|()| active.file.sync_data());
        match written {
            Ok(()) => {
                active.len += self.buf.len() as u64;
                self.disk_bytes += self.buf.len() as u64;
                {
                    let mut segments = self.shared.segments.lock();
                    if let Some(last) = segments.last_mut() {
                        last.end_seq = self.next_seq;
                        last.durable_len = active.len;
                    }
                    self.shared
                        .durable_end
                        .store(self.next_seq, Ordering::Release);
                }
                self.shared
                    .disk_bytes
                    .store(self.disk_bytes, Ordering::Relaxed);
                for (reply, seq) in self.acks.drain(..) {
                    let _ = reply.send(Ok(seq));
                }
            }
            Err(e) => {
                tracing::error!(path = %active.path.display(), error = %e, records = self.acks.len(), "spool write failed");
                let error = io_err(&active.path)(e);
                // Nothing of this write is acknowledged: cut it off so the next write starts on
                // the durable end, with the same sequence numbers.
                self.next_seq = self.acks.first().map_or(self.next_seq, |a| a.1);
                for (reply, _) in self.acks.drain(..) {
                    let _ = reply.send(Err(error.duplicate()));
                }
                let undone = active
                    .file
                    .set_len(active.len)
                    .and_then(|()| active.file.seek(SeekFrom::Start(active.len)))
                    .and_then(|_| active.file.sync_all());
                if let Err(e) = undone {
                    tracing::error!(path = %active.path.display(), error = %e, "spool cannot undo a failed write; it takes no more appends");
                    self.broken = true;
                }
            }
        }
        self.buf.clear();
    }

    /// Starts a segment at `next_seq`; the current one was flushed.
    fn roll(&mut self) -> Result<(), SpoolError> {
        self.active = None;
        let first_seq = self.next_seq;
        let path = segment_path(&self.dir, first_seq);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let created = file
            .write_all(&segment_header(first_seq))
            .and_then(|()| file.sync_all())
            .map_err(io_err(&path))
            // The new name must be durable before a record in it is acknowledged.
            .and_then(|()| sync_dir(&self.dir));
        if let Err(e) = created {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        self.disk_bytes += SEGMENT_HEADER;
        self.shared.segments.lock().push(SegMeta {
            first_seq,
            end_seq: first_seq,
            durable_len: SEGMENT_HEADER,
        });
        self.shared
            .disk_bytes
            .store(self.disk_bytes, Ordering::Relaxed);
        self.active = Some(Active {
            first_seq,
            path,
            file,
            len: SEGMENT_HEADER,
        });
        Ok(())
    }

    /// Deletes the segments wholly before `committed`, the active one included (the next append
    /// starts a new one).
    fn release(&mut self, committed: u64) -> Result<(), SpoolError> {
        let doomed: Vec<SegMeta> = {
            let mut segments = self.shared.segments.lock();
            let n = segments
                .iter()
                .take_while(|m| m.end_seq <= committed)
                .count();
            segments.drain(..n).collect()
        };
        let mut result = Ok(());
        for meta in doomed {
            if self
                .active
                .as_ref()
                .is_some_and(|a| a.first_seq == meta.first_seq)
            {
                self.active = None;
            }
            // A segment left behind by a failed deletion is deleted again on the next open.
            match remove_if_exists(&segment_path(&self.dir, meta.first_seq)) {
                Ok(()) => self.disk_bytes = self.disk_bytes.saturating_sub(meta.durable_len),
                Err(e) => {
                    tracing::warn!(error = %e, "spool cannot delete a committed segment");
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        self.shared
            .disk_bytes
            .store(self.disk_bytes, Ordering::Relaxed);
        result
    }
}

// === replay ===

/// An open segment the replayer reads from, by position, never past its durable end.
struct SegReader {
    first_seq: u64,
    path: PathBuf,
    file: File,
    offset: u64,
    next_seq: u64,
}

impl SegReader {
    /// Opens `meta`'s segment at record `seq`.
    fn open(dir: &Path, meta: &SegMeta, seq: u64) -> Result<Self, SpoolError> {
        let path = segment_path(dir, meta.first_seq);
        let file = File::open(&path).map_err(io_err(&path))?;
        let mut header = [0; SEGMENT_HEADER as usize];
        file.read_exact_at(&mut header, 0).map_err(io_err(&path))?;
        check_segment_header(&path, &header, meta.first_seq)?;
        let mut r = Self {
            first_seq: meta.first_seq,
            path,
            file,
            offset: SEGMENT_HEADER,
            next_seq: meta.first_seq,
        };
        while r.next_seq < seq {
            let chunk = r.chunk(meta)?;
            let mut pos = 0;
            while r.next_seq < seq {
                let Some(frame) = r.frame_at(&chunk, pos)? else {
                    break;
                };
                let found = le_u64(&frame[SEQ_AT..]);
                if found != r.next_seq {
                    return Err(corrupt(
                        &r.path,
                        r.offset + pos as u64,
                        format!("record {found} where {} was expected", r.next_seq),
                    ));
                }
                pos += frame.len();
                r.next_seq += 1;
            }
            r.offset += pos as u64;
        }
        Ok(r)
    }

    /// Whole frames from the reader's offset, about [`READ_AHEAD_BYTES`] of them (more if the
    /// first frame is larger), never past the segment's durable end.
    fn chunk(&self, meta: &SegMeta) -> Result<Vec<u8>, SpoolError> {
        let avail = meta.durable_len.saturating_sub(self.offset);
        if avail < FRAME_HEADER as u64 {
            return Err(corrupt(
                &self.path,
                self.offset,
                "the durable end falls inside a frame header",
            ));
        }
        let mut len = [0; 4];
        self.file
            .read_exact_at(&mut len, self.offset)
            .map_err(io_err(&self.path))?;
        let first = FRAME_HEADER as u64 + u64::from(le_u32(&len));
        if first > avail {
            return Err(corrupt(
                &self.path,
                self.offset,
                "frame runs past the durable end",
            ));
        }
        let mut buf = vec![0; avail.min(READ_AHEAD_BYTES).max(first) as usize];
        self.file
            .read_exact_at(&mut buf, self.offset)
            .map_err(io_err(&self.path))?;
        Ok(buf)
    }

    /// The whole frame at `pos` in `chunk`, checked, or `None` if the chunk ends first.
    fn frame_at<'c>(&self, chunk: &'c [u8], pos: usize) -> Result<Option<&'c [u8]>, SpoolError> {
        let Some(header) = chunk.get(pos..pos + FRAME_HEADER) else {
            return Ok(None);
        };
        let len = le_u32(header) as usize;
        let at = self.offset + pos as u64;
        if len < MIN_PAYLOAD {
            return Err(corrupt(
                &self.path,
                at,
                format!("frame length {len} is too small"),
            ));
        }
        let Some(frame) = chunk.get(pos..pos + FRAME_HEADER + len) else {
            return Ok(None);
        };
        if frame_crc(&frame[..4], &frame[FRAME_HEADER..]) != le_u32(&frame[4..8]) {
            return Err(corrupt(&self.path, at, "frame checksum mismatch"));
        }
        Ok(Some(frame))
    }
}

/// The replayer's position.
struct Replay {
    /// The next record `next_pending` hands out; `buffered` starts here.
    next: u64,
    /// One past the highest record ever handed out.
    handed_end: u64,
    buffered: VecDeque<(u64, SpoolRecord)>,
    reader: Option<SegReader>,
}

impl Replay {
    fn reset(&mut self, next: u64) {
        self.next = next;
        self.buffered.clear();
        self.reader = None;
    }
}

/// Where the replayer's reader stopped, and the records it read.
type ReadAhead = (Option<SegReader>, Vec<(u64, SpoolRecord)>);

/// Reads up to [`READ_AHEAD_RECORDS`] records from `next` on, within the durable segments.
fn read_ahead(
    dir: &Path,
    mut reader: Option<SegReader>,
    mut next: u64,
    segments: &[SegMeta],
) -> Result<ReadAhead, SpoolError> {
    let mut out = Vec::new();
    let mut bytes = 0;
    while out.len() < READ_AHEAD_RECORDS && bytes < READ_AHEAD_BYTES {
        let Some(meta) = segments
            .iter()
            .find(|m| m.first_seq <= next && next < m.end_seq)
        else {
            break;
        };
        let mut r = match reader.take() {
            Some(r) if r.first_seq == meta.first_seq && r.next_seq == next => r,
            _ => SegReader::open(dir, meta, next)?,
        };
        let chunk = r.chunk(meta)?;
        let mut pos = 0;
        while r.next_seq < meta.end_seq && out.len() < READ_AHEAD_RECORDS {
            let Some(frame) = r.frame_at(&chunk, pos)? else {
                break;
            };
            let at = r.offset + pos as u64;
            let decoded =
                decode(&frame[FRAME_HEADER..]).map_err(|why| corrupt(&r.path, at, why))?;
            if decoded.seq != r.next_seq {
                return Err(corrupt(
                    &r.path,
                    at,
                    format!("record {} where {} was expected", decoded.seq, r.next_seq),
                ));
            }
            out.push((decoded.seq, decoded.record));
            pos += frame.len();
            r.next_seq += 1;
        }
        r.offset += pos as u64;
        bytes += pos as u64;
        next = r.next_seq;
        reader = Some(r);
    }
    Ok((reader, out))
}

// === Spool ===

/// A durable local spool; cheap to clone (the clones share one writer and one replay
/// position). See the [module docs](self) for the guarantees and the format.
///
/// Dropping the last handle waits for the write in flight, if any (one fsync);
/// [`close`](Self::close) does that without blocking the caller's thread.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    max_bytes: u64,
    tx: mpsc::Sender<Cmd>,
    shared: Arc<Shared>,
    replay: tokio::sync::Mutex<Replay>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
    // Held (flock) for as long as the spool is open; released when dropped, after the writer.
    _lock: File,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Wait for the writer so the directory is never written by two spools: after a `close`
        // it has exited already; otherwise this waits for at most the write in flight.
        if let Some(handle) = self.writer.get_mut().take() {
            let (reply, _) = oneshot::channel();
            let _ = self.tx.send(Cmd::Close { reply });
            let _ = handle.join();
        }
    }
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.inner.dir)
            .field("len", &self.len())
            .field("disk_bytes", &self.disk_bytes())
            .finish()
    }
}

impl Spool {
    /// Opens (or creates) the spool in `config.dir`: checks every segment, cuts off a torn tail,
    /// deletes segments the checkpoint says are committed, and starts the writer thread.
    /// Replay resumes at the first uncommitted record.
    pub async fn open(config: SpoolConfig) -> Result<Self, SpoolError> {
        config.validate()?;
        let dir = config.dir.clone();
        let recovered = tokio::task::spawn_blocking(move || recover(&dir))
            .await
            .map_err(|e| join_err(&config.dir, e))??;
        let disk_bytes = recovered.segments.iter().map(|m| m.durable_len).sum();
        let shared = Arc::new(Shared {
            segments: Mutex::new(recovered.segments),
            durable_end: AtomicU64::new(recovered.next_seq),
            committed: AtomicU64::new(recovered.committed),
            disk_bytes: AtomicU64::new(disk_bytes),
        });
        let writer = Writer {
            dir: config.dir.clone(),
            max_bytes: config.max_bytes,
            segment_bytes: config.segment_bytes,
            batch_delay: config.batch_delay,
            shared: Arc::clone(&shared),
            active: recovered.active,
            next_seq: recovered.next_seq,
            disk_bytes,
            buf: Vec::new(),
            acks: Vec::new(),
            broken: false,
            closing: false,
        };
        let (tx, rx) = mpsc::channel();
        let handle = thread::Builder::new()
            .name("ha-mq-spool".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err(&config.dir))?;
        tracing::debug!(
            dir = %config.dir.display(),
            pending = recovered.next_seq.saturating_sub(recovered.committed),
            disk_bytes,
            "spool opened"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                dir: config.dir,
                max_bytes: config.max_bytes,
                tx,
                shared,
                replay: tokio::sync::Mutex::new(Replay {
                    next: recovered.committed,
                    handed_end: recovered.committed,
                    buffered: VecDeque::new(),
                    reader: None,
                }),
                writer: Mutex::new(Some(handle)),
                _lock: recovered.lock,
            }),
        })
    }

    /// Appends `record` and resolves with its sequence number once it is durable (fsynced). The
    /// appends that arrive while the writer is busy share its next fsync.
    ///
    /// Dropping the future before it resolves may or may not spool the record (it was not
    /// acknowledged, so either is allowed).
    pub async fn append(&self, record: &SpoolRecord) -> Result<u64, SpoolError> {
        let frame = encode(record)?;
        let max = self.inner.max_bytes.saturating_sub(SEGMENT_HEADER);
        if frame.len() as u64 > max {
            return Err(SpoolError::TooLarge {
                bytes: frame.len() as u64,
                max_bytes: max,
            });
        }
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Cmd::Append { frame, reply })
            .map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// The next record to replay and its sequence number, in append order, or `None` when every
    /// acknowledged record has been handed out (records appended later come next). Records stay
    /// in the spool until [`commit`](Self::commit)ted.
    pub async fn next_pending(&self) -> Result<Option<(u64, SpoolRecord)>, SpoolError> {
        let mut replay = self.inner.replay.lock().await;
        if replay.buffered.is_empty() {
            let durable_end = self.inner.shared.durable_end.load(Ordering::Acquire);
            if replay.next >= durable_end {
                return Ok(None);
            }
            let segments = self.inner.shared.segments.lock().clone();
            let dir = self.inner.dir.clone();
            let reader = replay.reader.take();
            let next = replay.next;
            let (reader, records) =
                tokio::task::spawn_blocking(move || read_ahead(&dir, reader, next, &segments))
                    .await
                    .map_err(|e| join_err(&self.inner.dir, e))??;
            replay.reader = reader;
            replay.buffered.extend(records);
        }
        let Some((seq, record)) = replay.buffered.pop_front() else {
            return Ok(None);
        };
        replay.next = seq + 1;
        replay.handed_end = replay.handed_end.max(seq + 1);
        Ok(Some((seq, record)))
    }

    /// Marks every record up to and including `seq` as replayed: writes the checkpoint durably,
    /// then deletes the segments that hold only committed records. A `seq` below the commit
    /// point is a no-op; one not handed out by [`next_pending`](Self::next_pending) is
    /// [`SpoolError::NotRead`].
    pub async fn commit(&self, seq: u64) -> Result<(), SpoolError> {
        let mut replay = self.inner.replay.lock().await;
        if seq >= replay.handed_end {
            return Err(SpoolError::NotRead {
                seq,
                read_end: replay.handed_end,
            });
        }
        let committed = seq + 1;
        if committed <= self.inner.shared.committed.load(Ordering::Acquire) {
            return Ok(());
        }
        let dir = self.inner.dir.clone();
        tokio::task::spawn_blocking(move || write_checkpoint(&dir, committed))
            .await
            .map_err(|e| join_err(&self.inner.dir, e))??;
        self.inner
            .shared
            .committed
            .store(committed, Ordering::Release);
        if replay.next < committed {
            replay.reset(committed);
        }
        drop(replay);
        let (reply, rx) = oneshot::channel();
        // The checkpoint is durable: a closed writer only means the deletion waits for the
        // next open.
        if self
            .inner
            .tx
            .send(Cmd::Release { committed, reply })
            .is_ok()
            && let Ok(result) = rx.await
        {
            result?;
        }
        Ok(())
    }

    /// Moves the replay position back to the first uncommitted record (after a failed send), so
    /// `next_pending` hands out the uncommitted records again.
    pub async fn rewind(&self) {
        let mut replay = self.inner.replay.lock().await;
        let committed = self.inner.shared.committed.load(Ordering::Acquire);
        if replay.next != committed {
            replay.reset(committed);
        }
    }

    /// Acknowledged records not yet committed.
    pub fn len(&self) -> u64 {
        let end = self.inner.shared.durable_end.load(Ordering::Acquire);
        end.saturating_sub(self.inner.shared.committed.load(Ordering::Acquire))
    }

    /// No acknowledged record is waiting to be committed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The segment files' size on disk, the figure `max_bytes` bounds (committed records count
    /// until their segment is deleted).
    pub fn disk_bytes(&self) -> u64 {
        self.inner.shared.disk_bytes.load(Ordering::Relaxed)
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Stops taking appends (later ones fail with [`SpoolError::Closed`]) once those already
    /// queued are durable, and waits for the writer thread to exit. Replay still works; the
    /// directory stays locked until every handle is dropped.
    pub async fn close(&self) {
        let (reply, rx) = oneshot::channel();
        if self.inner.tx.send(Cmd::Close { reply }).is_ok() {
            let _ = rx.await;
        }
        let handle = self.inner.writer.lock().take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}
