//! Which commands are reads: a short, explicit list. Everything else is a write.
//!
//! A command that is not on the list (an unknown command, a module command, `EVAL`) is treated
//! as a write: it is held during a failover and never retried after an ambiguous failure. The
//! cost of a read wrongly taken for a write is a short wait; the cost of the opposite is a
//! lost acknowledged write.

use redis::{Arg, Cmd, Pipeline};

/// The commands known to be read-only (upper case, sorted for the binary search).
pub const READ_ONLY: &[&str] = &[
    "BITCOUNT",
    "BITPOS",
    "DBSIZE",
    "DUMP",
    "ECHO",
    "EXISTS",
    "GEODIST",
    "GEOHASH",
    "GEOPOS",
    "GEOSEARCH",
    "GET",
    "GETBIT",
    "GETRANGE",
    "HEXISTS",
    "HGET",
    "HGETALL",
    "HKEYS",
    "HLEN",
    "HMGET",
    "HRANDFIELD",
    "HSCAN",
    "HSTRLEN",
    "HVALS",
    "INFO",
    "KEYS",
    "LINDEX",
    "LLEN",
    "LPOS",
    "LRANGE",
    "MGET",
    "PFCOUNT",
    "PING",
    "PTTL",
    "RANDOMKEY",
    "ROLE",
    "SCAN",
    "SCARD",
    "SDIFF",
    "SINTER",
    "SINTERCARD",
    "SISMEMBER",
    "SMEMBERS",
    "SMISMEMBER",
    "SRANDMEMBER",
    "SSCAN",
    "STRLEN",
    "SUBSTR",
    "TIME",
    "TOUCH",
    "TTL",
    "TYPE",
    "XINFO",
    "XLEN",
    "XPENDING",
    "XRANGE",
    "XREAD",
    "XREVRANGE",
    "ZCARD",
    "ZCOUNT",
    "ZDIFF",
    "ZINTER",
    "ZINTERCARD",
    "ZLEXCOUNT",
    "ZMSCORE",
    "ZRANDMEMBER",
    "ZRANGE",
    "ZRANGEBYLEX",
    "ZRANGEBYSCORE",
    "ZRANK",
    "ZREVRANGE",
    "ZREVRANGEBYLEX",
    "ZREVRANGEBYSCORE",
    "ZREVRANK",
    "ZSCAN",
    "ZSCORE",
    "ZUNION",
];

/// The longest name on [`READ_ONLY`]; a longer one is never a read.
const LONGEST: usize = 16;

/// `name`'s bytes as a little-endian integer, upper-cased (`None` if longer than [`LONGEST`]):
/// the lookup compares integers, with no string comparison, no UTF-8 check and no copy.
const fn pack(name: &[u8]) -> Option<u128> {
    if name.len() > LONGEST {
        return None;
    }
    let mut v = 0u128;
    let mut i = 0;
    while i < name.len() {
        v |= (name[i].to_ascii_uppercase() as u128) << (8 * i);
        i += 1;
    }
    Some(v)
}

/// [`READ_ONLY`] packed and sorted, built at compile time.
const PACKED: [u128; READ_ONLY.len()] = {
    let mut out = [0u128; READ_ONLY.len()];
    let mut i = 0;
    while i < READ_ONLY.len() {
        out[i] = match pack(READ_ONLY[i].as_bytes()) {
            Some(v) => v,
            None => panic!("a READ_ONLY name is longer than LONGEST"),
        };
        i += 1;
    }
    // Insertion sort (const context).
    let mut i = 1;
    while i < out.len() {
        let mut j = i;
        while j > 0 && out[j - 1] > out[j] {
            let t = out[j - 1];
            out[j - 1] = out[j];
            out[j] = t;
            j -= 1;
        }
        i += 1;
    }
    out
};

/// True when `name` (any case) is on the read-only list.
///
/// ```
/// assert!(ha_redis::command::is_read_only_name(b"get"));
/// assert!(!ha_redis::command::is_read_only_name(b"SET"));
/// assert!(!ha_redis::command::is_read_only_name(b"MY.MODULE.CMD"));
/// ```
pub fn is_read_only_name(name: &[u8]) -> bool {
    // A NUL byte would pack like a shorter name: never a command name on the list.
    !name.is_empty()
        && !name.contains(&0)
        && pack(name).is_some_and(|v| PACKED.binary_search(&v).is_ok())
}

/// True when `cmd` is a write (not known read-only; an empty command counts as a write).
pub fn is_write(cmd: &Cmd) -> bool {
    match cmd.args_iter().next() {
        Some(Arg::Simple(name)) => !is_read_only_name(name),
        _ => true,
    }
}

/// True when any command of `pipeline` is a write (`MULTI`/`EXEC` count as writes).
pub fn pipeline_is_write(pipeline: &Pipeline) -> bool {
    pipeline.is_transaction() || pipeline.cmd_iter().any(is_write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_is_sorted_upper_case_and_short() {
        let mut sorted = READ_ONLY.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, READ_ONLY);
        for n in READ_ONLY {
            assert_eq!(n.to_ascii_uppercase(), *n);
            assert!(n.len() <= LONGEST);
        }
    }

    /// The packed lookup agrees with a plain case-insensitive search of the list, for every
    /// name on it in three cases, and for near misses: prefixes, extensions, a NUL byte, a
    /// non-ASCII byte, empty, longer than any name.
    #[test]
    fn packed_lookup_matches_the_list() {
        let plain = |name: &[u8]| {
            READ_ONLY
                .iter()
                .any(|n| n.as_bytes().eq_ignore_ascii_case(name))
        };
        let mut probes: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"\0".to_vec(),
            b"GET\0".to_vec(),
            b"\0GET".to_vec(),
            b"G\xc9T".to_vec(),
            b"ZREVRANGEBYSCORES".to_vec(),
            vec![b'A'; 40],
        ];
        for n in READ_ONLY {
            let b = n.as_bytes();
            probes.push(b.to_vec());
            probes.push(b.to_ascii_lowercase());
            let mut mixed = b.to_vec();
            mixed[0] = mixed[0].to_ascii_lowercase();
            probes.push(mixed);
            probes.push(b[..b.len() - 1].to_vec());
            probes.push([b, b"X"].concat());
            probes.push([b"X", b].concat());
        }
        for p in &probes {
            assert_eq!(
                is_read_only_name(p),
                plain(p),
                "{:?}",
                String::from_utf8_lossy(p)
            );
        }
        assert!(is_read_only_name(b"zrevrangebyscore"));
        assert!(!is_read_only_name(b"GET\0"));
    }

    #[test]
    fn reads_writes_and_pipelines() {
        assert!(!is_write(redis::cmd("GET").arg("k")));
        assert!(!is_write(redis::cmd("hgetall").arg("k")));
        assert!(is_write(redis::cmd("SET").arg("k").arg(1)));
        assert!(is_write(redis::cmd("EVAL").arg("return 1").arg(0)));
        assert!(is_write(&redis::Cmd::new()));
        let mut p = redis::pipe();
        p.get("a").get("b");
        assert!(!pipeline_is_write(&p));
        p.set("c", 1);
        assert!(pipeline_is_write(&p));
        let mut t = redis::pipe();
        t.atomic().get("a");
        assert!(pipeline_is_write(&t));
    }
}
