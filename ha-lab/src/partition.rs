//! Network partitions between IDC address ranges, with nftables.
//!
//! Rules live only in the lab's own table `table inet halab`: one base chain per partitioned
//! IDC (output hook, named after its range, e.g. `idc4_127_0_1_0_24`) holding the drop rules
//! of that partition. Every change is one `nft -f` transaction that never depends on a listing
//! read before it: [`partition`] (re)creates the IDC's chain with its rules, [`heal`] deletes
//! that chain, [`heal_all`] the table. The kernel applies transactions one after the other, so
//! a heal racing a partition (of the same IDC or another) leaves each IDC as its last change
//! made it. Only that table is ever deleted. Needs root and the `nft` program (Debian package
//! `nftables`).
//!
//! ```no_run
//! # fn demo() -> Result<(), ha_lab::LabError> {
//! use ha_lab::partition::{heal, partition};
//! let bj_a = "127.0.1.0/24".parse().unwrap();
//! partition(bj_a, &["127.0.2.0/24".parse().unwrap(), "127.0.3.0/24".parse().unwrap()])?;
//! heal(bj_a)?;
//! # Ok(()) }
//! ```

use std::{
    io::Write,
    net::{IpAddr, Ipv6Addr},
    process::{Command, Stdio},
};

use ipnet::IpNet;

use crate::{LabError, process::find_program};

/// The lab's own nftables table (family `inet`).
pub const TABLE: &str = "halab";

/// True when the `nft` program is on `PATH`.
pub fn nft_available() -> bool {
    find_program("nft").is_some()
}

fn missing() -> LabError {
    LabError::MissingBinary {
        program: "nft".into(),
        package: "nftables".into(),
    }
}

/// The chain of `idc`'s partition: a name that encodes the range exactly (IPv6 in full).
fn chain(idc: IpNet) -> String {
    match idc {
        IpNet::V4(n) => {
            let [a, b, c, d] = n.network().octets();
            format!("idc4_{a}_{b}_{c}_{d}_{}", n.prefix_len())
        }
        IpNet::V6(n) => format!("idc6_{:032x}_{}", u128::from(n.network()), n.prefix_len()),
    }
}

/// The range encoded in a chain name made by [`chain`].
fn chain_idc(name: &str) -> Option<IpNet> {
    if let Some(rest) = name.strip_prefix("idc4_") {
        let parts: Vec<u8> = rest
            .split('_')
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        let [a, b, c, d, prefix] = parts[..] else {
            return None;
        };
        return IpNet::new(IpAddr::from([a, b, c, d]), prefix).ok();
    }
    let (hex, prefix) = name.strip_prefix("idc6_")?.split_once('_')?;
    let ip = Ipv6Addr::from(u128::from_str_radix(hex, 16).ok()?);
    IpNet::new(IpAddr::V6(ip), prefix.parse().ok()?).ok()
}

fn family(net: IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "ip",
        IpNet::V6(_) => "ip6",
    }
}

/// Runs `nft` with `args`, feeding `script` on stdin when given; returns stdout.
fn nft(action: &str, args: &[&str], script: Option<&str>) -> Result<String, LabError> {
    let program = find_program("nft").ok_or_else(missing)?;
    let fail = |message: String| LabError::Nft {
        action: action.to_owned(),
        message,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if script.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let (Some(script), Some(mut stdin)) = (script, child.stdin.take()) {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The lines that (re)create `idc`'s chain, empty, in `table`.
fn chain_lines(table: &str, idc: IpNet) -> String {
    let chain = chain(idc);
    format!(
        "add table inet {table}\n\
         add chain inet {table} {chain} {{ type filter hook output priority 0; policy accept; }}\n\
         flush chain inet {table} {chain}\n"
    )
}

/// The transaction of [`partition`]: `idc`'s chain emptied and filled again, so partitioning
/// twice replaces rather than adds.
fn partition_script(table: &str, idc: IpNet, others: &[IpNet]) -> String {
    let fam = family(idc);
    let chain = chain(idc);
    let mut script = chain_lines(table, idc);
    let others: Vec<String> = others
        .iter()
        .filter(|o| family(**o) == fam)
        .map(IpNet::to_string)
        .collect();
    if others.is_empty() {
        return script;
    }
    let others = others.join(", ");
    for (s, d) in [
        (idc.to_string(), &others),
        (others.clone(), &idc.to_string()),
    ] {
        script.push_str(&format!(
            "add rule inet {table} {chain} {fam} saddr {{ {s} }} {fam} daddr {{ {d} }} drop\n"
        ));
    }
    script
}

/// The transaction of [`heal`]: `idc`'s chain created if missing, then deleted, so that healing
/// an IDC that is not partitioned needs no listing first and is not an error.
fn heal_script(table: &str, idc: IpNet) -> String {
    let mut script = chain_lines(table, idc);
    script.push_str(&format!("delete chain inet {table} {}\n", chain(idc)));
    script
}

/// Drops all traffic in both directions between `idc_cidr` and each of `others` (atomically,
/// one nft transaction; a second call replaces the first). Ranges of a different address family
/// than `idc_cidr` are skipped.
pub fn partition(idc_cidr: IpNet, others: &[IpNet]) -> Result<(), LabError> {
    let script = partition_script(TABLE, idc_cidr, others);
    nft(
        &format!("partition {idc_cidr}"),
        &["-f", "-"],
        Some(&script),
    )?;
    tracing::info!(idc = %idc_cidr, ?others, "partitioned");
    Ok(())
}

/// Removes the partition of `idc_cidr` (one nft transaction). Healing an IDC that is not
/// partitioned is not an error. The table stays, empty, until [`heal_all`].
pub fn heal(idc_cidr: IpNet) -> Result<(), LabError> {
    nft(
        &format!("heal {idc_cidr}"),
        &["-f", "-"],
        Some(&heal_script(TABLE, idc_cidr)),
    )?;
    tracing::info!(idc = %idc_cidr, "healed");
    Ok(())
}

/// The IDC ranges partitioned now (one chain each in the lab table), sorted.
pub fn partitioned() -> Result<Vec<IpNet>, LabError> {
    let listing = match nft("list tables", &["list", "tables"], None)?
        .lines()
        .any(|l| l.trim() == format!("table inet {TABLE}"))
    {
        false => return Ok(Vec::new()),
        true => nft("list table", &["list", "table", "inet", TABLE], None),
    };
    // The table can go between the two commands (a concurrent heal_all).
    let Ok(listing) = listing else {
        return Ok(Vec::new());
    };
    let mut idcs: Vec<IpNet> = listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("chain ")?.strip_suffix(" {"))
        .filter_map(chain_idc)
        .collect();
    idcs.sort();
    Ok(idcs)
}

/// Deletes the lab table (every partition; one nft transaction that creates the table first,
/// so it is not an error when there is none). Only `table inet halab` is touched.
pub fn heal_all() -> Result<(), LabError> {
    let script = format!("add table inet {TABLE}\ndelete table inet {TABLE}\n");
    nft("delete table", &["-f", "-"], Some(&script))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn chain_names_encode_the_range_exactly() {
        for idc in [
            "127.0.1.0/24",
            "127.0.1.221/32",
            "fd00:1::/64",
            "::ffff:1.2.3.4/128",
        ] {
            let name = chain(net(idc));
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{name}"
            );
            assert_eq!(chain_idc(&name), Some(net(idc)), "{name}");
        }
        assert_eq!(chain(net("127.0.1.0/24")), "idc4_127_0_1_0_24");
        assert_ne!(
            chain(net("::ffff:1.2.3.4/128")),
            chain(net("::ffff:1:2:3:4/128"))
        );
        assert_eq!(chain_idc("out"), None);
    }

    #[test]
    fn a_partition_is_one_transaction_that_replaces_and_a_heal_needs_no_listing() {
        let p = partition_script(
            "halab",
            net("127.0.1.0/24"),
            &[net("127.0.2.0/24"), net("127.0.3.0/24"), net("fd00::/8")],
        );
        let lines: Vec<&str> = p.lines().collect();
        assert_eq!(lines[0], "add table inet halab");
        assert!(
            lines[1]
                .starts_with("add chain inet halab idc4_127_0_1_0_24 { type filter hook output")
        );
        assert_eq!(lines[2], "flush chain inet halab idc4_127_0_1_0_24");
        assert_eq!(
            lines[3],
            "add rule inet halab idc4_127_0_1_0_24 ip saddr { 127.0.1.0/24 } ip daddr { 127.0.2.0/24, 127.0.3.0/24 } drop"
        );
        assert_eq!(
            lines[4],
            "add rule inet halab idc4_127_0_1_0_24 ip saddr { 127.0.2.0/24, 127.0.3.0/24 } ip daddr { 127.0.1.0/24 } drop"
        );
        assert_eq!(lines.len(), 5, "the IPv6 range is skipped: {p}");
        let h = heal_script("halab", net("127.0.1.0/24"));
        assert!(
            h.ends_with("delete chain inet halab idc4_127_0_1_0_24\n"),
            "{h}"
        );
        assert!(!h.contains("handle"), "{h}");
    }
}
