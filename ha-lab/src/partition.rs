//! Network partitions between IDC address ranges, with nftables.
//!
//! Rules live only in the lab's own table `table inet halab` (chain `out`, output hook), and
//! each rule carries the comment `halab:<idc cidr>` of the partition that made it, so
//! [`heal`] removes exactly those. Only that table is ever deleted. Needs root and the `nft`
//! program (Debian package `nftables`).
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
    process::{Command, Stdio},
};

use ipnet::IpNet;

use crate::{LabError, process::find_program};

/// The lab's own nftables table (family `inet`).
pub const TABLE: &str = "halab";
const CHAIN: &str = "out";

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

fn tag(idc: IpNet) -> String {
    format!("halab:{idc}")
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

/// Drops all traffic in both directions between `idc_cidr` and each of `others` (atomically,
/// one nft transaction). Ranges of a different address family than `idc_cidr` are skipped.
pub fn partition(idc_cidr: IpNet, others: &[IpNet]) -> Result<(), LabError> {
    let fam = family(idc_cidr);
    let tag = tag(idc_cidr);
    let mut script = format!(
        "add table inet {TABLE}\nadd chain inet {TABLE} {CHAIN} {{ type filter hook output priority 0; policy accept; }}\n"
    );
    for other in others.iter().filter(|o| family(**o) == fam) {
        for (s, d) in [(idc_cidr, *other), (*other, idc_cidr)] {
            script.push_str(&format!(
                "add rule inet {TABLE} {CHAIN} {fam} saddr {s} {fam} daddr {d} drop comment \"{tag}\"\n"
            ));
        }
    }
    nft(
        &format!("partition {idc_cidr}"),
        &["-f", "-"],
        Some(&script),
    )?;
    tracing::info!(idc = %idc_cidr, ?others, "partitioned");
    Ok(())
}

/// Handles of the rules in the lab chain, with their comment.
fn rules() -> Result<Option<Vec<(u64, String)>>, LabError> {
    if !table_exists()? {
        return Ok(None);
    }
    let listing = nft(
        "list chain",
        &["-a", "list", "chain", "inet", TABLE, CHAIN],
        None,
    );
    let listing = match listing {
        Ok(l) => l,
        // The table exists without our chain: nothing of ours to heal.
        Err(_) => return Ok(Some(Vec::new())),
    };
    let mut out = Vec::new();
    for line in listing.lines() {
        let Some((rule, handle)) = line.rsplit_once("# handle ") else {
            continue;
        };
        if !rule.contains(" drop") {
            continue;
        }
        let Ok(handle) = handle.trim().parse::<u64>() else {
            continue;
        };
        let comment = rule
            .split_once("comment \"")
            .and_then(|(_, c)| c.split_once('"'))
            .map(|(c, _)| c.to_owned())
            .unwrap_or_default();
        out.push((handle, comment));
    }
    Ok(Some(out))
}

fn table_exists() -> Result<bool, LabError> {
    let tables = nft("list tables", &["list", "tables"], None)?;
    Ok(tables
        .lines()
        .any(|l| l.trim() == format!("table inet {TABLE}")))
}

/// Removes the rules made by [`partition`] for `idc_cidr`; deletes the lab table when no rule
/// remains. Healing an IDC that is not partitioned is not an error.
pub fn heal(idc_cidr: IpNet) -> Result<(), LabError> {
    let Some(rules) = rules()? else {
        return Ok(());
    };
    let tag = tag(idc_cidr);
    let mut script = String::new();
    let mut remaining = 0;
    for (handle, comment) in &rules {
        if *comment == tag {
            script.push_str(&format!(
                "delete rule inet {TABLE} {CHAIN} handle {handle}\n"
            ));
        } else {
            remaining += 1;
        }
    }
    if !script.is_empty() {
        nft(&format!("heal {idc_cidr}"), &["-f", "-"], Some(&script))?;
    }
    if remaining == 0 {
        heal_all()?;
    }
    tracing::info!(idc = %idc_cidr, "healed");
    Ok(())
}

/// Deletes the lab table (every partition). Only `table inet halab` is touched.
pub fn heal_all() -> Result<(), LabError> {
    if !table_exists()? {
        return Ok(());
    }
    match nft("delete table", &["delete", "table", "inet", TABLE], None) {
        Ok(_) => Ok(()),
        // Someone else deleted it between the check and now.
        Err(_) if !table_exists()? => Ok(()),
        Err(e) => Err(e),
    }
}
