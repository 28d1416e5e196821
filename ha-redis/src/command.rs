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

/// True when `name` (any case) is on the read-only list.
///
/// ```
/// assert!(ha_redis::command::is_read_only_name(b"get"));
/// assert!(!ha_redis::command::is_read_only_name(b"SET"));
/// assert!(!ha_redis::command::is_read_only_name(b"MY.MODULE.CMD"));
/// ```
pub fn is_read_only_name(name: &[u8]) -> bool {
    if name.len() > 20 {
        return false;
    }
    let mut buf = [0u8; 20];
    let upper = &mut buf[..name.len()];
    upper.copy_from_slice(name);
    upper.make_ascii_uppercase();
    let Ok(upper) = std::str::from_utf8(upper) else {
        return false;
    };
    READ_ONLY.binary_search(&upper).is_ok()
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
            assert!(n.len() <= 20);
        }
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
