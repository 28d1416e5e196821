//! Rates as nginx writes them (`10r/s`, `30r/m`), stored the way nginx stores them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A request rate, kept as nginx keeps it: an integer number of milli-requests per second.
///
/// `"10r/s"` is 10000, `"60r/m"` is exactly 1000 and `"7r/m"` is 116 (integer division, as in
/// `ngx_http_limit_req_zone`), so the same line drains exactly as it did in nginx.
///
/// ```
/// use ha_ratelimit::Rate;
/// let r: Rate = "7r/m".parse().unwrap();
/// assert_eq!(r.milli_per_sec(), 116);
/// assert_eq!("10r/s".parse::<Rate>().unwrap(), Rate::per_second(10));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    milli_per_sec: u64,
}

impl Rate {
    /// `n` requests per second (`nr/s`).
    ///
    /// `per_second(0)` is a value of the type, but not a valid limit: validating, building or
    /// reloading a configuration with it is a [`ConfigError`](crate::ConfigError) naming the
    /// limit (`limit[i].rate`), never a panic in a check.
    pub const fn per_second(n: u64) -> Rate {
        Rate {
            milli_per_sec: n.saturating_mul(1000),
        }
    }

    /// `n` requests per minute (`nr/m`), truncated to whole milli-requests per second like nginx.
    ///
    /// `per_minute(0)` is refused like [`Rate::per_second(0)`](Rate::per_second).
    pub const fn per_minute(n: u64) -> Rate {
        Rate {
            milli_per_sec: n.saturating_mul(1000) / 60,
        }
    }

    /// A rate given directly in milli-requests per second; `None` when zero.
    pub const fn from_milli_per_sec(milli_per_sec: u64) -> Option<Rate> {
        if milli_per_sec == 0 {
            None
        } else {
            Some(Rate { milli_per_sec })
        }
    }

    /// The rate in milli-requests per second (nginx's `ctx->rate`).
    pub const fn milli_per_sec(self) -> u64 {
        self.milli_per_sec
    }

    /// The rate in requests per second, as a float (for logs and alerts).
    pub fn per_sec_f64(self) -> f64 {
        self.milli_per_sec as f64 / 1000.0
    }
}

/// Why a rate string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid rate {text:?}: {reason}")]
pub struct RateParseError {
    text: String,
    reason: &'static str,
}

impl FromStr for Rate {
    type Err = RateParseError;

    fn from_str(text: &str) -> Result<Rate, RateParseError> {
        let err = |reason| RateParseError {
            text: text.to_string(),
            reason,
        };
        let t = text.trim();
        let (num, per_minute) = if let Some(n) = t.strip_suffix("r/s") {
            (n, false)
        } else if let Some(n) = t.strip_suffix("r/m") {
            (n, true)
        } else {
            return Err(err(
                "expected a number followed by r/s or r/m, e.g. \"10r/s\"",
            ));
        };
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err("the count must be a whole positive number"));
        }
        let n: u64 = num.parse().map_err(|_| err("the count is too large"))?;
        let rate = if per_minute {
            Rate::per_minute(n)
        } else {
            Rate::per_second(n)
        };
        if rate.milli_per_sec == 0 {
            return Err(err("the rate must be positive"));
        }
        Ok(rate)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.milli_per_sec.is_multiple_of(1000) {
            write!(f, "{}r/s", self.milli_per_sec / 1000)
        } else {
            write!(f, "{}mr/s", self.milli_per_sec)
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn parses_like_nginx() {
        assert_eq!("10r/s".parse::<Rate>().unwrap().milli_per_sec(), 10_000);
        assert_eq!("60r/m".parse::<Rate>().unwrap().milli_per_sec(), 1000);
        assert_eq!("7r/m".parse::<Rate>().unwrap().milli_per_sec(), 116);
        assert_eq!("1r/m".parse::<Rate>().unwrap().milli_per_sec(), 16);
        for bad in [
            "",
            "10",
            "10r/h",
            "r/s",
            "-1r/s",
            "0r/s",
            "1.5r/s",
            "99999999999999999999r/s",
        ] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
        assert_eq!(Rate::per_second(10).to_string(), "10r/s");
    }
}
